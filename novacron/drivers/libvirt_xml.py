"""Typed libvirt XML: domains, storage pools and volumes, snapshots, NovaCron's domain metadata.

Each config object builds its XML with :mod:`xml.etree.ElementTree` (``to_xml``) and is parsed
back the same way (``from_xml``), also from the fuller XML libvirt returns; nothing is built from
string templates. Parsing reads only the fields modelled here and ignores the rest.

This module imports no libvirt: it is pure data and unit-tested without a daemon.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Literal

from novacron.errors import InvalidRequest

NS = "https://novacron.dev/xmlns/libvirt/instance/1"
"""Namespace of NovaCron's element in a domain's ``<metadata>``."""
NS_PREFIX = "novacron"

DiskBus = Literal["virtio", "sata", "scsi", "ide"]
InterfaceKind = Literal["network", "bridge", "user"]
DISK_BUSES: dict[str, DiskBus] = {"virtio": "virtio", "sata": "sata", "scsi": "scsi",
                                   "ide": "ide"}
_INTERFACE_KINDS: dict[str, InterfaceKind] = {"network": "network", "bridge": "bridge",
                                              "user": "user"}

_UNITS: dict[str, int] = {
    "b": 1, "bytes": 1,
    "k": 1024, "kib": 1024, "kb": 1000,
    "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3,
    "t": 1024**4, "tib": 1024**4, "tb": 1000**4,
    "p": 1024**5, "pib": 1024**5, "pb": 1000**5,
}


def _parse(xml: str, root_tag: str) -> ET.Element:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise InvalidRequest(f"malformed {root_tag} XML: {exc}") from exc
    if root.tag != root_tag:
        raise InvalidRequest(f"expected a <{root_tag}> document, got <{root.tag}>")
    return root


def _text(parent: ET.Element, path: str, default: str = "") -> str:
    node = parent.find(path)
    return default if node is None or node.text is None else node.text.strip()


def _size(node: ET.Element | None, default_unit: str) -> int:
    """A libvirt scaled integer (``<memory unit='KiB'>65536</memory>``) in bytes."""
    if node is None or not (node.text or "").strip():
        return 0
    unit = (node.get("unit") or default_unit).lower()
    if unit not in _UNITS:
        raise InvalidRequest(f"unknown size unit {unit!r} in <{node.tag}>")
    return int((node.text or "0").strip()) * _UNITS[unit]


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    node = ET.SubElement(parent, tag, attrs)
    if text is not None:
        node.text = text
    return node


def _serialize(root: ET.Element) -> str:
    ET.indent(root)
    return ET.tostring(root, encoding="unicode")


# -- NovaCron metadata -----------------------------------------------------------------------


@dataclass(frozen=True)
class Metadata:
    """What NovaCron keeps in a domain: enough to re-attach after an actor restart and to fence.

    ``volumes`` are the paths of the volumes NovaCron created for this guest (deleted with it);
    anything else attached (a template, a shared disk) is never deleted.
    """

    vm_id: str
    epoch: int = 0
    name: str = ""
    volumes: tuple[str, ...] = ()

    def to_element(self, qualified: bool = True) -> ET.Element:
        """The ``<instance>`` element, in NovaCron's namespace unless ``qualified`` is false."""

        def tag(name: str) -> str:
            return f"{{{NS}}}{name}" if qualified else name

        root = ET.Element(tag("instance"))
        _sub(root, tag("vm-id"), self.vm_id)
        _sub(root, tag("epoch"), str(self.epoch))
        if self.name:
            _sub(root, tag("name"), self.name)
        for path in self.volumes:
            _sub(root, tag("volume"), path)
        return root

    def to_xml(self) -> str:
        """The element as ``virDomainSetMetadata`` takes it (libvirt adds the namespace)."""
        return _serialize(self.to_element(qualified=False))

    @classmethod
    def from_element(cls, root: ET.Element) -> Metadata:
        """Parse ``<instance>`` whether its tags are namespaced or not."""
        prefix = f"{{{NS}}}" if root.tag.startswith("{") else ""
        epoch = _text(root, f"{prefix}epoch", "0")
        try:
            epoch_value = int(epoch)
        except ValueError as exc:
            raise InvalidRequest(f"NovaCron metadata has a bad epoch {epoch!r}") from exc
        return cls(
            vm_id=_text(root, f"{prefix}vm-id"),
            epoch=epoch_value,
            name=_text(root, f"{prefix}name"),
            volumes=tuple((v.text or "").strip() for v in root.findall(f"{prefix}volume")),
        )

    @classmethod
    def from_xml(cls, xml: str) -> Metadata:
        """Parse what ``virDomainGetMetadata`` returns."""
        try:
            root = ET.fromstring(xml)
        except ET.ParseError as exc:
            raise InvalidRequest(f"malformed NovaCron metadata: {exc}") from exc
        if root.tag not in ("instance", f"{{{NS}}}instance"):
            raise InvalidRequest(f"expected NovaCron <instance> metadata, got <{root.tag}>")
        return cls.from_element(root)


# -- domains ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Disk:
    """A file-backed disk (a volume's path in a storage pool, or any file the host can read)."""

    path: str
    target: str = "vda"
    bus: DiskBus = "virtio"
    format: str = "qcow2"
    readonly: bool = False
    cache: str | None = None

    def to_element(self) -> ET.Element:
        """The ``<disk>`` element."""
        disk = ET.Element("disk", {"type": "file", "device": "disk"})
        driver = _sub(disk, "driver", name="qemu", type=self.format)
        if self.cache:
            driver.set("cache", self.cache)
        _sub(disk, "source", file=self.path)
        _sub(disk, "target", dev=self.target, bus=self.bus)
        if self.readonly:
            _sub(disk, "readonly")
        return disk

    @classmethod
    def from_element(cls, disk: ET.Element) -> Disk:
        """Parse a file ``<disk>``."""
        driver = disk.find("driver")
        target = disk.find("target")
        source = disk.find("source")
        return cls(
            path="" if source is None else source.get("file", ""),
            target="" if target is None else target.get("dev", ""),
            bus=DISK_BUSES.get("" if target is None else target.get("bus", ""), "virtio"),
            format="raw" if driver is None else driver.get("type", "raw"),
            readonly=disk.find("readonly") is not None,
            cache=None if driver is None else driver.get("cache"),
        )


@dataclass(frozen=True)
class Interface:
    """A network interface: on a libvirt network, a host bridge, or user-mode (SLIRP)."""

    kind: InterfaceKind
    source: str = ""
    model: str = "virtio"
    mac: str | None = None

    def __post_init__(self) -> None:
        if self.kind != "user" and not self.source:
            raise InvalidRequest(f"a {self.kind} interface needs a source name")

    def to_element(self) -> ET.Element:
        """The ``<interface>`` element."""
        iface = ET.Element("interface", {"type": self.kind})
        if self.mac:
            _sub(iface, "mac", address=self.mac)
        if self.kind == "network":
            _sub(iface, "source", network=self.source)
        elif self.kind == "bridge":
            _sub(iface, "source", bridge=self.source)
        _sub(iface, "model", type=self.model)
        return iface

    @classmethod
    def from_element(cls, iface: ET.Element) -> Interface:
        """Parse an ``<interface>`` of a modelled kind."""
        kind = _INTERFACE_KINDS.get(iface.get("type", ""))
        if kind is None:
            raise InvalidRequest(f"unsupported interface type {iface.get('type')!r}")
        source = iface.find("source")
        model = iface.find("model")
        mac = iface.find("mac")
        return cls(
            kind=kind,
            source="" if source is None or kind == "user" else source.get(kind, ""),
            model="" if model is None else model.get("type", ""),
            mac=None if mac is None else mac.get("address"),
        )


@dataclass(frozen=True)
class Serial:
    """The serial console (a pty), its output also appended to ``log_file`` when set."""

    log_file: str | None = None

    def to_element(self) -> ET.Element:
        """The ``<serial>`` element."""
        serial = ET.Element("serial", {"type": "pty"})
        if self.log_file:
            _sub(serial, "log", file=self.log_file, append="on")
        _sub(serial, "target", port="0")
        return serial

    @classmethod
    def from_element(cls, serial: ET.Element) -> Serial:
        """Parse a ``<serial>``."""
        log = serial.find("log")
        return cls(log_file=None if log is None else log.get("file"))


@dataclass(frozen=True)
class KernelBoot:
    """Direct kernel boot: the host's kernel and initrd files with a command line."""

    kernel: str
    initrd: str | None = None
    cmdline: str = ""


@dataclass(frozen=True)
class Domain:
    """A libvirt domain definition, as much of it as NovaCron sets.

    Without ``kernel_boot`` the guest boots from its first disk.
    """

    name: str
    uuid: str
    memory_mib: int
    vcpus: int
    domain_type: str = "kvm"
    title: str = ""
    arch: str | None = None
    machine: str | None = None
    cpu_mode: str | None = None
    kernel_boot: KernelBoot | None = None
    disks: tuple[Disk, ...] = ()
    interfaces: tuple[Interface, ...] = ()
    serial: Serial | None = None
    balloon_stats_period_s: int | None = None
    metadata: Metadata | None = None

    def __post_init__(self) -> None:
        if self.memory_mib <= 0 or self.vcpus <= 0:
            raise InvalidRequest("a domain needs at least 1 vCPU and 1 MiB of memory",
                                 details={"vcpus": self.vcpus, "memory_mib": self.memory_mib})
        targets = [d.target for d in self.disks]
        if len(set(targets)) != len(targets):
            raise InvalidRequest(f"disk targets must be unique, got {targets}")

    def to_xml(self) -> str:
        """The domain XML for ``virDomainDefineXML``."""
        root = ET.Element("domain", {"type": self.domain_type})
        _sub(root, "name", self.name)
        _sub(root, "uuid", self.uuid)
        if self.title:
            _sub(root, "title", self.title)
        if self.metadata is not None:
            ET.register_namespace(NS_PREFIX, NS)
            _sub(root, "metadata").append(self.metadata.to_element())
        _sub(root, "memory", str(self.memory_mib), unit="MiB")
        _sub(root, "vcpu", str(self.vcpus))
        os_node = _sub(root, "os")
        os_type = _sub(os_node, "type", "hvm")
        if self.arch:
            os_type.set("arch", self.arch)
        if self.machine:
            os_type.set("machine", self.machine)
        if self.kernel_boot is not None:
            _sub(os_node, "kernel", self.kernel_boot.kernel)
            if self.kernel_boot.initrd:
                _sub(os_node, "initrd", self.kernel_boot.initrd)
            if self.kernel_boot.cmdline:
                _sub(os_node, "cmdline", self.kernel_boot.cmdline)
        else:
            _sub(os_node, "boot", dev="hd")
        features = _sub(root, "features")
        _sub(features, "acpi")
        _sub(features, "apic")
        if self.cpu_mode:
            _sub(root, "cpu", mode=self.cpu_mode)
        devices = _sub(root, "devices")
        for disk in self.disks:
            devices.append(disk.to_element())
        for iface in self.interfaces:
            devices.append(iface.to_element())
        if self.serial is not None:
            devices.append(self.serial.to_element())
        if self.balloon_stats_period_s is not None:
            balloon = _sub(devices, "memballoon", model="virtio")
            _sub(balloon, "stats", period=str(self.balloon_stats_period_s))
        return _serialize(root)

    @classmethod
    def from_xml(cls, xml: str) -> Domain:
        """Parse domain XML (ours, or libvirt's fuller ``virDomainGetXMLDesc`` output)."""
        root = _parse(xml, "domain")
        os_node = root.find("os")
        os_type = None if os_node is None else os_node.find("type")
        kernel = "" if os_node is None else _text(os_node, "kernel")
        kernel_boot = None
        if os_node is not None and kernel:
            kernel_boot = KernelBoot(kernel=kernel, initrd=_text(os_node, "initrd") or None,
                                     cmdline=_text(os_node, "cmdline"))
        devices = root.find("devices")
        if devices is None:
            devices = ET.Element("devices")
        disks = tuple(Disk.from_element(d) for d in devices.findall("disk")
                      if d.get("type") == "file" and d.get("device", "disk") == "disk")
        interfaces = tuple(Interface.from_element(i) for i in devices.findall("interface")
                           if i.get("type", "") in _INTERFACE_KINDS)
        serial_node = devices.find("serial")
        balloon = devices.find("memballoon")
        stats = None if balloon is None else balloon.find("stats")
        meta_node = root.find(f"metadata/{{{NS}}}instance")
        cpu = root.find("cpu")
        return cls(
            name=_text(root, "name"),
            uuid=_text(root, "uuid"),
            memory_mib=_size(root.find("memory"), "KiB") // 1024**2,
            vcpus=int(_text(root, "vcpu", "1")),
            domain_type=root.get("type", ""),
            title=_text(root, "title"),
            arch=None if os_type is None else os_type.get("arch"),
            machine=None if os_type is None else os_type.get("machine"),
            cpu_mode=None if cpu is None else cpu.get("mode"),
            kernel_boot=kernel_boot,
            disks=disks,
            interfaces=interfaces,
            serial=None if serial_node is None else Serial.from_element(serial_node),
            balloon_stats_period_s=None if stats is None else int(stats.get("period", "0")),
            metadata=None if meta_node is None else Metadata.from_element(meta_node),
        )


# -- storage ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pool:
    """A directory storage pool; the sizes are filled in when parsed from libvirt."""

    name: str
    path: str
    capacity_bytes: int = 0
    allocation_bytes: int = 0
    available_bytes: int = 0

    def to_xml(self) -> str:
        """The pool XML for ``virStoragePoolDefineXML``."""
        root = ET.Element("pool", {"type": "dir"})
        _sub(root, "name", self.name)
        _sub(_sub(root, "target"), "path", self.path)
        return _serialize(root)

    @classmethod
    def from_xml(cls, xml: str) -> Pool:
        """Parse ``virStoragePoolGetXMLDesc`` output."""
        root = _parse(xml, "pool")
        return cls(
            name=_text(root, "name"),
            path=_text(root, "target/path"),
            capacity_bytes=_size(root.find("capacity"), "bytes"),
            allocation_bytes=_size(root.find("allocation"), "bytes"),
            available_bytes=_size(root.find("available"), "bytes"),
        )


@dataclass(frozen=True)
class Backing:
    """The image a copy-on-write volume reads unwritten blocks from."""

    path: str
    format: str = "qcow2"


@dataclass(frozen=True)
class Volume:
    """A storage volume: a qcow2 or raw file, optionally an overlay on a backing image."""

    name: str
    capacity_bytes: int
    format: str = "qcow2"
    allocation_bytes: int = 0
    path: str = ""
    backing: Backing | None = None

    def __post_init__(self) -> None:
        if self.capacity_bytes < 0 or self.allocation_bytes < 0:
            raise InvalidRequest("volume sizes cannot be negative",
                                 details={"volume": self.name})
        if "/" in self.name or not self.name:
            raise InvalidRequest(f"bad volume name {self.name!r}")

    def to_xml(self) -> str:
        """The volume XML for ``virStorageVolCreateXML``."""
        root = ET.Element("volume", {"type": "file"})
        _sub(root, "name", self.name)
        _sub(root, "capacity", str(self.capacity_bytes), unit="bytes")
        _sub(root, "allocation", str(self.allocation_bytes), unit="bytes")
        target = _sub(root, "target")
        _sub(target, "format", type=self.format)
        if self.backing is not None:
            backing = _sub(root, "backingStore")
            _sub(backing, "path", self.backing.path)
            _sub(backing, "format", type=self.backing.format)
        return _serialize(root)

    @classmethod
    def from_xml(cls, xml: str) -> Volume:
        """Parse ``virStorageVolGetXMLDesc`` output."""
        root = _parse(xml, "volume")
        fmt = root.find("target/format")
        backing_node = root.find("backingStore")
        backing = None
        if backing_node is not None and _text(backing_node, "path"):
            backing_fmt = backing_node.find("format")
            backing = Backing(path=_text(backing_node, "path"),
                              format="raw" if backing_fmt is None
                              else backing_fmt.get("type", "raw"))
        return cls(
            name=_text(root, "name"),
            capacity_bytes=_size(root.find("capacity"), "bytes"),
            allocation_bytes=_size(root.find("allocation"), "bytes"),
            format="raw" if fmt is None else fmt.get("type", "raw"),
            path=_text(root, "target/path"),
            backing=backing,
        )


# -- snapshots -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """A domain snapshot; ``state`` (libvirt's word, e.g. ``running``) and ``created_at`` are
    filled in when parsed from libvirt."""

    name: str
    description: str = ""
    state: str = ""
    created_at: int = 0
    parent: str | None = None

    def to_xml(self) -> str:
        """The snapshot XML for ``virDomainSnapshotCreateXML``."""
        root = ET.Element("domainsnapshot")
        _sub(root, "name", self.name)
        if self.description:
            _sub(root, "description", self.description)
        return _serialize(root)

    @classmethod
    def from_xml(cls, xml: str) -> Snapshot:
        """Parse ``virDomainSnapshotGetXMLDesc`` output."""
        root = _parse(xml, "domainsnapshot")
        return cls(
            name=_text(root, "name"),
            description=_text(root, "description"),
            state=_text(root, "state"),
            created_at=int(_text(root, "creationTime", "0")),
            parent=_text(root, "parent/name") or None,
        )
