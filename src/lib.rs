//! ringkv umbrella package: binaries, end-to-end tests and examples.
