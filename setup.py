"""Package mapping for the three source roots (design.md §5).

``src/halfclose`` -> ``halfclose``, ``agent`` -> ``halfclose.agent``,
``operator`` -> ``halfclose.operator``.  Subpackages are discovered so that
adding a module never needs an edit here.
"""

from setuptools import find_packages, setup

ROOTS = {"halfclose": "src/halfclose", "halfclose.agent": "agent", "halfclose.operator": "operator"}

packages: list[str] = []
for name, path in ROOTS.items():
    packages.append(name)
    # src/halfclose/agent and src/halfclose/operator are symlinks kept for static
    # tools; the real roots are mapped above, so skip them here.
    packages.extend(
        f"{name}.{sub}"
        for sub in find_packages(path, exclude=["agent", "agent.*", "operator", "operator.*"])
    )

setup(
    package_dir=ROOTS,
    packages=packages,
    package_data={"halfclose": ["py.typed"]},
)
