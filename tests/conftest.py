"""Shared fixtures: each support plugin registers its own (see tests/support/)."""

pytest_plugins: list[str] = [
    "support.lab_fixtures",  # make_lab, lab, module_lab: the leak lab
    "support.controlplane",  # control_plane, kube: real etcd + kube-apiserver + controller manager
    "support.podcgroup",  # containers: lab processes as fake containerd containers
]
