"""Typed libvirt XML: built with ElementTree, parsed back the same, also from libvirt's output."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from hypothesis import given
from hypothesis import strategies as st

from novacron.drivers.libvirt_xml import (
    NS,
    Backing,
    Disk,
    Domain,
    Interface,
    KernelBoot,
    Metadata,
    Pool,
    Serial,
    Snapshot,
    Volume,
)
from novacron.errors import InvalidRequest

FULL = Domain(
    name="novacron-vm-1",
    uuid="6f1d6c0e-3b1e-4b5e-9a53-6e6f76616372",
    memory_mib=128,
    vcpus=2,
    domain_type="qemu",
    title="web & db <1>",
    arch="x86_64",
    machine="pc",
    cpu_mode="host-model",
    kernel_boot=KernelBoot(kernel="/boot/vmlinuz", initrd="/boot/initrd.img",
                           cmdline="console=ttyS0 quiet"),
    disks=(Disk(path="/pool/novacron-vm-1-disk0.qcow2"),
           Disk(path="/pool/data.raw", target="vdb", format="raw", readonly=True, cache="none")),
    interfaces=(Interface(kind="network", source="default", mac="52:54:00:12:34:56"),
                Interface(kind="bridge", source="br0", model="e1000"),
                Interface(kind="user")),
    serial=Serial(log_file="/var/log/novacron/vm-1.log"),
    balloon_stats_period_s=2,
    metadata=Metadata(vm_id="vm-1", epoch=7, name="web",
                      volumes=("/pool/novacron-vm-1-disk0.qcow2",)),
)

# What libvirt 9 returns for a domain like FULL (trimmed): extra elements and attributes,
# memory in KiB, a backing chain, a console mirroring the serial port, namespaced metadata.
LIBVIRT_OUTPUT = f"""<domain type='qemu' id='3'>
  <name>novacron-vm-1</name>
  <uuid>6f1d6c0e-3b1e-4b5e-9a53-6e6f76616372</uuid>
  <title>web</title>
  <metadata>
    <novacron:instance xmlns:novacron="{NS}">
      <novacron:vm-id>vm-1</novacron:vm-id>
      <novacron:epoch>7</novacron:epoch>
      <novacron:volume>/pool/novacron-vm-1-disk0.qcow2</novacron:volume>
    </novacron:instance>
  </metadata>
  <memory unit='KiB'>131072</memory>
  <currentMemory unit='KiB'>131072</currentMemory>
  <vcpu placement='static'>1</vcpu>
  <resource><partition>/machine</partition></resource>
  <os>
    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
    <kernel>/boot/vmlinuz</kernel>
    <initrd>/boot/initrd.img</initrd>
    <cmdline>console=ttyS0</cmdline>
    <boot dev='hd'/>
  </os>
  <features><acpi/><apic/></features>
  <cpu mode='custom' match='exact' check='full'><model fallback='forbid'>qemu64</model></cpu>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/pool/novacron-vm-1-disk0.qcow2' index='2'/>
      <backingStore type='file' index='3'>
        <format type='qcow2'/>
        <source file='/templates/base.qcow2'/>
        <backingStore/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <target dev='hdc' bus='ide'/>
    </disk>
    <interface type='direct'><source dev='eth0' mode='vepa'/></interface>
    <serial type='pty'>
      <source path='/dev/pts/3'/>
      <log file='/var/log/novacron/vm-1.log' append='on'/>
      <target type='isa-serial' port='0'><model name='isa-serial'/></target>
      <alias name='serial0'/>
    </serial>
    <console type='pty' tty='/dev/pts/3'>
      <target type='serial' port='0'/>
    </console>
    <memballoon model='virtio'>
      <stats period='2'/>
      <alias name='balloon0'/>
    </memballoon>
  </devices>
  <seclabel type='dynamic' model='dac' relabel='yes'/>
</domain>
"""


def test_domain_round_trips() -> None:
    assert Domain.from_xml(FULL.to_xml()) == FULL


def test_domain_xml_is_escaped_and_namespaced() -> None:
    root = ET.fromstring(FULL.to_xml())
    assert root.findtext("title") == "web & db <1>"
    meta = root.find(f"metadata/{{{NS}}}instance")
    assert meta is not None
    assert meta.findtext(f"{{{NS}}}vm-id") == "vm-1"
    assert root.find("os/boot") is None  # kernel boot instead
    assert root.find("features/acpi") is not None  # ACPI shutdown needs it


def test_domain_parses_libvirt_output() -> None:
    dom = Domain.from_xml(LIBVIRT_OUTPUT)
    assert dom.memory_mib == 128
    assert dom.vcpus == 1
    assert dom.machine == "pc-i440fx-7.2"
    assert dom.kernel_boot == KernelBoot("/boot/vmlinuz", "/boot/initrd.img", "console=ttyS0")
    assert dom.disks == (Disk(path="/pool/novacron-vm-1-disk0.qcow2"),)  # not the cdrom
    assert dom.interfaces == ()  # a direct interface is not modelled
    assert dom.serial == Serial(log_file="/var/log/novacron/vm-1.log")
    assert dom.balloon_stats_period_s == 2
    assert dom.metadata == Metadata(vm_id="vm-1", epoch=7,
                                    volumes=("/pool/novacron-vm-1-disk0.qcow2",))


def test_disk_boot_without_kernel() -> None:
    dom = Domain(name="d", uuid="6f1d6c0e-3b1e-4b5e-9a53-6e6f76616372", memory_mib=64, vcpus=1,
                 disks=(Disk(path="/p/d.qcow2"),))
    root = ET.fromstring(dom.to_xml())
    boot = root.find("os/boot")
    assert boot is not None
    assert boot.get("dev") == "hd"
    assert Domain.from_xml(dom.to_xml()) == dom


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"memory_mib": 0}, "at least"),
    ({"vcpus": 0}, "at least"),
    ({"disks": (Disk(path="/a"), Disk(path="/b"))}, "unique"),
])
def test_domain_refuses_bad_shapes(kwargs: dict[str, object], message: str) -> None:
    base: dict[str, object] = {"name": "d", "uuid": "u", "memory_mib": 64, "vcpus": 1}
    with pytest.raises(InvalidRequest, match=message):
        Domain(**{**base, **kwargs})  # type: ignore[arg-type]


def test_interface_needs_a_source() -> None:
    with pytest.raises(InvalidRequest, match="source"):
        Interface(kind="bridge")


@pytest.mark.parametrize("xml", ["<domain", "<pool/>", ""])
def test_malformed_xml_is_invalid_request(xml: str) -> None:
    with pytest.raises(InvalidRequest):
        Domain.from_xml(xml)


def test_metadata_for_set_metadata_is_unqualified() -> None:
    meta = Metadata(vm_id="vm-1", epoch=3, volumes=("/a", "/b"))
    root = ET.fromstring(meta.to_xml())
    assert root.tag == "instance"
    assert Metadata.from_xml(meta.to_xml()) == meta
    assert Metadata.from_element(meta.to_element()) == meta


def test_metadata_bad_epoch() -> None:
    with pytest.raises(InvalidRequest, match="epoch"):
        Metadata.from_xml("<instance><vm-id>x</vm-id><epoch>soon</epoch></instance>")


def test_volume_overlay_round_trips() -> None:
    vol = Volume(name="disk0.qcow2", capacity_bytes=2**30,
                 backing=Backing(path="/templates/base.qcow2", format="raw"))
    root = ET.fromstring(vol.to_xml())
    assert root.findtext("backingStore/path") == "/templates/base.qcow2"
    assert Volume.from_xml(vol.to_xml()) == vol


def test_volume_parses_libvirt_output() -> None:
    vol = Volume.from_xml("""<volume type='file'>
      <name>d.qcow2</name><key>/p/d.qcow2</key>
      <capacity unit='bytes'>1073741824</capacity><allocation unit='KiB'>196</allocation>
      <physical unit='bytes'>200704</physical>
      <target><path>/p/d.qcow2</path><format type='qcow2'/>
        <permissions><mode>0600</mode></permissions></target>
      <backingStore><path>/t/base.qcow2</path><format type='qcow2'/></backingStore>
    </volume>""")
    assert vol == Volume(name="d.qcow2", capacity_bytes=2**30, allocation_bytes=196 * 1024,
                         path="/p/d.qcow2", backing=Backing(path="/t/base.qcow2"))


@pytest.mark.parametrize("name", ["", "a/b"])
def test_volume_refuses_bad_names(name: str) -> None:
    with pytest.raises(InvalidRequest):
        Volume(name=name, capacity_bytes=1)


def test_pool_round_trips_and_parses_sizes() -> None:
    pool = Pool(name="novacron", path="/var/lib/libvirt/images/novacron")
    assert Pool.from_xml(pool.to_xml()) == pool
    parsed = Pool.from_xml("""<pool type='dir'><name>p</name>
      <capacity unit='bytes'>100</capacity><allocation unit='bytes'>40</allocation>
      <available unit='bytes'>60</available><target><path>/p</path></target></pool>""")
    assert (parsed.capacity_bytes, parsed.allocation_bytes, parsed.available_bytes) == (
        100, 40, 60)


def test_unknown_size_unit_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="unit"):
        Pool.from_xml("<pool><name>p</name><capacity unit='parsecs'>1</capacity></pool>")


def test_snapshot_builds_and_parses() -> None:
    snap = Snapshot(name="before-upgrade", description="pre 2.0")
    assert Snapshot.from_xml(snap.to_xml()) == snap
    parsed = Snapshot.from_xml("""<domainsnapshot><name>s2</name><state>running</state>
      <parent><name>s1</name></parent><creationTime>1700000000</creationTime>
      <memory snapshot='internal'/><domain type='kvm'><name>x</name></domain>
      </domainsnapshot>""")
    assert parsed == Snapshot(name="s2", state="running", created_at=1700000000, parent="s1")


_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=20)
_path = st.from_regex(r"/[a-z0-9_./-]{1,30}", fullmatch=True)


@given(
    memory=st.integers(1, 2**20), vcpus=st.integers(1, 512), title=_text.map(str.strip),
    paths=st.lists(_path, max_size=4, unique=True), epoch=st.integers(0, 2**40),
    kernel=st.none() | _path, log_file=st.none() | _path,
)
def test_domain_round_trips_any_shape(memory: int, vcpus: int, title: str, paths: list[str],
                                      epoch: int, kernel: str | None,
                                      log_file: str | None) -> None:
    dom = Domain(
        name="novacron-x", uuid="6f1d6c0e-3b1e-4b5e-9a53-6e6f76616372", memory_mib=memory,
        vcpus=vcpus, title=title,
        kernel_boot=None if kernel is None else KernelBoot(kernel=kernel),
        disks=tuple(Disk(path=p, target=f"vd{chr(97 + i)}") for i, p in enumerate(paths)),
        serial=Serial(log_file=log_file),
        metadata=Metadata(vm_id="x", epoch=epoch, volumes=tuple(paths)),
    )
    assert Domain.from_xml(dom.to_xml()) == dom
