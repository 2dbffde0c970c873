//! KubeArmorPolicy / KubeArmorHostPolicy YAML → [`PolicySet`](super::PolicySet).
//! (Being written; see the issue on KubeArmor policies.)
