//! Decision records from the kernel's ring buffer, turned into KubeArmor alerts.
pub mod alert;
pub mod guard;
