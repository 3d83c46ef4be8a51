//! Page-aware codec for QEMU migration streams (sans-IO). Under construction.
