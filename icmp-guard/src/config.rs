//! The agent configuration file. (Being written.)
