//! QEMU test guests and helpers. Under construction.
