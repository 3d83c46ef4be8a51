//! Offsets in the two byte streams the codec connects, as distinct types so one cannot be passed
//! where the other is meant.
//!
//! - [`StreamOffset`]: bytes of the original stream (what the source QEMU wrote, what the decoder
//!   releases to the destination QEMU).
//! - [`WireOffset`]: bytes of the encoded stream (what the encoder emits, what the tunnel carries
//!   on a flow direction's lanes and acknowledges, what the decoder consumed).

use std::fmt;

macro_rules! offset_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(u64);

        impl $name {
            /// The start of the stream.
            pub const ZERO: Self = Self(0);

            /// The offset `bytes` bytes into the stream.
            pub const fn new(bytes: u64) -> Self {
                Self(bytes)
            }

            /// Bytes from the start of the stream.
            pub const fn get(self) -> u64 {
                self.0
            }

            /// The offset `bytes` further on.
            #[must_use]
            pub const fn advanced(self, bytes: u64) -> Self {
                Self(self.0 + bytes)
            }

            /// Bytes from `earlier` to `self` (0 if `earlier` lies beyond).
            pub const fn bytes_since(self, earlier: Self) -> u64 {
                self.0.saturating_sub(earlier.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

offset_type!(
    /// An offset in the original (source QEMU's) byte stream.
    StreamOffset
);
offset_type!(
    /// An offset in the encoded (wire) byte stream of one flow direction.
    WireOffset
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic() {
        let a = WireOffset::new(10);
        assert_eq!(a.advanced(5), WireOffset::new(15));
        assert_eq!(a.advanced(5).bytes_since(a), 5);
        assert_eq!(a.bytes_since(a.advanced(5)), 0);
        assert_eq!(StreamOffset::ZERO.get(), 0);
        assert_eq!(a.to_string(), "10");
    }
}
