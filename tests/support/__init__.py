"""First-class test support: the real Kubernetes control plane, lab fixtures."""
