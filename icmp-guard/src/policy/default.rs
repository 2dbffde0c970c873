//! The embedded default policy. (Being written.)
