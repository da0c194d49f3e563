"""First-class test support: the Kubernetes API emulator, lab fixtures."""
