"""Devices a model may have to fit, and the share of their RAM an app can really use.

Total RAM is what the vendor ships; what one app gets is less, and that share is what ``fit`` compares
an estimate against:

* iOS / iPadOS (``share`` 0.5 on 3-4 GB devices, 0.6 from 6 GB): the kernel's jetsam kills a foreground
  app at a per-device limit. Developers' published crash measurements (the long-running "iOS app
  maximum memory budget" survey on Stack Overflow, and ``os_proc_available_memory()`` readings) put it
  near half of RAM on 2-4 GB devices (iPhone X: ~1.4 of 3 GB) and somewhat above half on 6-8 GB ones.
  The ``increased-memory-limit`` entitlement can raise it on some iPads; we do not assume it.
* Android (0.5): the low-memory killer reclaims background and then foreground processes; with the OS,
  system UI and Google services resident, about half of RAM is left for one app on 8-12 GB phones
  (``ActivityManager.getMemoryInfo().availMem`` on an idle device is typically 40-55 %).
* Jetson Orin Nano (0.75): CPU and GPU share the 8 GB; JetPack's desktop-less image leaves ~6 GB.
* A 16 GB laptop (0.7): browser, IDE and OS commonly hold 4-5 GB.

These are planning numbers, not guarantees; ``--device 3.5`` takes the usable GB directly instead.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import DeviceError

GiB = 1024 ** 3


@dataclass(frozen=True)
class Device:
    name: str
    ram_gb: float
    share: float
    platform: str
    label: str

    @property
    def usable_bytes(self) -> int:
        return int(self.ram_gb * self.share * GiB)


DEVICES = {d.name: d for d in (
    Device("iphone-x", 3, 0.5, "ios", "iPhone X (3 GB)"),
    Device("iphone-13", 4, 0.5, "ios", "iPhone 13 (4 GB)"),
    Device("ipad-pro-11-gen1", 4, 0.5, "ios", "iPad Pro 11\" 1st gen (4 GB)"),
    Device("iphone-16", 8, 0.6, "ios", "iPhone 16 (8 GB)"),
    Device("ipad-air-6", 8, 0.6, "ios", "iPad Air 6 / M2 (8 GB)"),
    Device("galaxy-s24-ultra", 12, 0.5, "android", "Samsung Galaxy S24 Ultra (12 GB)"),
    Device("snapdragon-888-phone", 8, 0.5, "android", "Snapdragon 888 phone, e.g. Galaxy S21 (8 GB)"),
    Device("jetson-orin-nano", 8, 0.75, "jetson", "NVIDIA Jetson Orin Nano (8 GB shared CPU/GPU)"),
    Device("laptop-16gb", 16, 0.7, "laptop", "Laptop with 16 GB"),
)}

#: Generic names (as a package config's "device" uses them) -> a representative device.
ALIASES = {"iphone": "iphone-13", "ipad": "ipad-pro-11-gen1", "android": "snapdragon-888-phone",
           "jetson": "jetson-orin-nano", "laptop": "laptop-16gb"}


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.strip().lower()).strip("-")


#: "iPad Pro 11\" 1st gen" -> "ipad-pro-11-gen1": a label (without its parenthesis) names its device too.
_BY_LABEL = {_norm(d.label.split(" (")[0]): d.name for d in DEVICES.values()}


def get_device(name: str | float) -> Device:
    """A device by name (case and punctuation ignored), alias, or a number of usable GB."""
    if isinstance(name, (int, float)) and not isinstance(name, bool):
        gb = float(name)
    else:
        s = str(name).strip()
        try:
            gb = float(s.lower().removesuffix("gb").strip())
        except ValueError:
            key = _norm(s)
            key = ALIASES.get(key, key)
            key = _BY_LABEL.get(key, key)
            if key not in DEVICES:
                raise DeviceError(f"unknown device {name!r}; known devices: {', '.join(DEVICES)} "
                                  f"(aliases: {', '.join(ALIASES)}), or a number of usable GB like 3.5") from None
            return DEVICES[key]
    if not gb > 0 or gb != gb or gb == float("inf"):
        raise DeviceError(f"device memory must be a positive number of GB, got {name!r}")
    return Device(f"{gb:g}gb", gb, 1.0, "custom", f"{gb:g} GB usable")


def fit(total_bytes: int, device: Device) -> dict:
    usable = device.usable_bytes
    return {"device": device.name, "label": device.label, "ram_bytes": int(device.ram_gb * GiB),
            "usable_bytes": usable, "needed_bytes": int(total_bytes), "fits": total_bytes <= usable,
            "headroom_bytes": usable - int(total_bytes)}
