"""The kinds every emulator serves without being told: core/v1, leases, events, CRDs, kopf.

Built-in kinds carry no schema (the real server validates them in Go; here they are
stored as given), except for the few rules tests trip over: a pod needs containers.
kopf's peering CRDs are built in because kopf's leader election looks for them.
"""

from __future__ import annotations

from typing import Any

from .resources import Registry, ResourceType, field_getters

KOPF_PEERING_CRDS: list[dict[str, Any]] = [
    {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.kopf.dev"},
        "spec": {
            "scope": scope,
            "group": "kopf.dev",
            "names": {"kind": kind, "plural": plural, "singular": plural[:-1]},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "status": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    for kind, plural, scope in (
        ("ClusterKopfPeering", "clusterkopfpeerings", "Cluster"),
        ("KopfPeering", "kopfpeerings", "Namespaced"),
    )
]

EVENT_FIELDS = field_getters(
    [
        "involvedObject.kind",
        "involvedObject.namespace",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.apiVersion",
        "involvedObject.resourceVersion",
        "involvedObject.fieldPath",
        "reason",
        "reportingComponent",
        "source",
        "type",
    ],
    aliases={"source": "source.component"},
)

BUILTIN_TYPES: list[ResourceType] = [
    ResourceType(
        group="",
        version="v1",
        plural="namespaces",
        kind="Namespace",
        singular="namespace",
        namespaced=False,
        short_names=("ns",),
        subresources=("status",),
        selectable_fields=field_getters(["status.phase"]),
        return_deleted_object=True,
        tracks_generation=False,
    ),
    ResourceType(
        group="",
        version="v1",
        plural="pods",
        kind="Pod",
        singular="pod",
        namespaced=True,
        short_names=("po",),
        categories=("all",),
        subresources=("status",),
        selectable_fields=field_getters(
            [
                "spec.nodeName",
                "spec.restartPolicy",
                "spec.schedulerName",
                "spec.serviceAccountName",
                "spec.hostNetwork",
                "status.phase",
                "status.podIP",
                "status.nominatedNodeName",
            ]
        ),
        return_deleted_object=True,
    ),
    ResourceType(
        group="",
        version="v1",
        plural="nodes",
        kind="Node",
        singular="node",
        namespaced=False,
        short_names=("no",),
        subresources=("status",),
        selectable_fields=field_getters(["spec.unschedulable"]),
        return_deleted_object=True,
        tracks_generation=False,
    ),
    ResourceType(
        group="",
        version="v1",
        plural="configmaps",
        kind="ConfigMap",
        singular="configmap",
        namespaced=True,
        short_names=("cm",),
        selectable_fields=field_getters([]),
        tracks_generation=False,
    ),
    ResourceType(
        group="",
        version="v1",
        plural="events",
        kind="Event",
        singular="event",
        namespaced=True,
        short_names=("ev",),
        selectable_fields=EVENT_FIELDS,
        tracks_generation=False,
    ),
    ResourceType(
        group="events.k8s.io",
        version="v1",
        plural="events",
        kind="Event",
        singular="event",
        namespaced=True,
        short_names=("ev",),
        selectable_fields=field_getters(
            [
                "regarding.kind",
                "regarding.namespace",
                "regarding.name",
                "regarding.uid",
                "reason",
                "reportingController",
                "type",
            ],
        ),
        tracks_generation=False,
    ),
    ResourceType(
        group="coordination.k8s.io",
        version="v1",
        plural="leases",
        kind="Lease",
        singular="lease",
        namespaced=True,
        selectable_fields=field_getters([]),
        tracks_generation=False,
    ),
    ResourceType(
        group="apiextensions.k8s.io",
        version="v1",
        plural="customresourcedefinitions",
        kind="CustomResourceDefinition",
        singular="customresourcedefinition",
        namespaced=False,
        short_names=("crd", "crds"),
        categories=("api-extensions",),
        subresources=("status",),
        selectable_fields=field_getters([]),
    ),
]

# Namespaces every cluster starts with.
INITIAL_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


def builtin_registry() -> Registry:
    registry = Registry()
    for rt in BUILTIN_TYPES:
        registry.add(rt)
    for crd in KOPF_PEERING_CRDS:
        registry.add_crd(crd)
    return registry
