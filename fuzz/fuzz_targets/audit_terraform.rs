#![no_main]
icmp_guard_fuzz::fuzz_target_with_shape!(
    icmp_guard_fuzz::targets::audit_terraform,
    icmp_guard_fuzz::mutate::Shape::Hcl
);
