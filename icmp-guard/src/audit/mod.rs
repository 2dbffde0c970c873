//! `icmp-guard audit`: EC2-044 "Unrestricted ICMP access" for security-group definitions.
//! (Being written.)
