"""x86 architecture helpers: pure data and encoders, no engine and no device."""
