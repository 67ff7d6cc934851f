"""Energy and CO2 of a piece of work: measured where the hardware says, estimated where it does not.

In order of preference, per kind of hardware:
- CPU: Intel/AMD RAPL package counters (/sys/class/powercap/intel-rapl:N/energy_uj), when readable;
  otherwise the CPU's rated power (TDP) from CodeCarbon's cpu_power.csv for the whole time
  (an upper bound, as the ML Impact calculator counts a GPU's TDP).
- NVIDIA GPU: NVML's energy counter (pynvml, when importable); otherwise the GPU's TDP from the
  ML Impact calculator's gpus.csv for the whole time.
Carbon intensity (g CO2-eq per kWh) comes from a region flag: "provider:region" (the ML Impact
calculator's impact.csv, e.g. "azure:eastus"), or a country's ISO code (CodeCarbon's
global_energy_mix.json, e.g. "FRA"); otherwise the world average CodeCarbon uses, 475 g/kWh.
PUE is not included, as in the calculator.
"""

from __future__ import annotations

import csv
import json
import platform
import re
import time
from pathlib import Path
from typing import Any

from distillery.models.common import DistilleryError

DEFAULT_CARBON_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "carbon"
RAPL_ROOT = Path("/sys/class/powercap")
WORLD_AVERAGE_G_PER_KWH = 475.0  # CodeCarbon's methodology: world average when a region is unknown
FALLBACK_CPU_TDP_W = 85.0  # CodeCarbon's default when a CPU model is not in its table


# ----------------------------------------------------------------------------------------------
# Tables


def carbon_intensity(region: str | None, data_dir: Path = DEFAULT_CARBON_DATA) -> tuple[float, str]:
    """(g CO2-eq per kWh, where the number came from) for a region flag (module docstring)."""
    if not region:
        return WORLD_AVERAGE_G_PER_KWH, "world average (CodeCarbon)"
    if ":" in region:
        provider, name = region.split(":", 1)
        with open(data_dir / "mlco2-impact" / "data" / "impact.csv", encoding="utf-8-sig", newline="") as f:
            for row in csv.DictReader(f):
                if row["provider"].lower() == provider.lower() and row["region"].lower() == name.lower():
                    return float(row["impact"]), f"ML Impact calculator, {row['providerName']} {row['region']}"
        raise DistilleryError(
            f"region {region!r} is not in the ML Impact calculator's impact.csv; use provider:region "
            "(e.g. azure:eastus, gcp:us-central1, aws:us-east-1) or a country ISO code (e.g. FRA)."
        )
    mix = json.loads((data_dir / "codecarbon" / "global_energy_mix.json").read_text(encoding="utf-8"))
    country = mix.get(region.upper())
    if country is None:
        raise DistilleryError(
            f"region {region!r} is neither provider:region nor a country ISO code of CodeCarbon's energy mix (e.g. USA, FRA)."
        )
    return float(country["carbon_intensity"]), f"CodeCarbon energy mix, {country['country_name']} {country['year']}"


def _normalise(name: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"\((r|tm)\)|®|™|\bcpu\b|@.*$", " ", name.lower())).strip()


def cpu_rated_power(cpu_name: str, data_dir: Path = DEFAULT_CARBON_DATA) -> tuple[float, str]:
    """(TDP in W, the table entry matched) from CodeCarbon's cpu_power.csv; the longest entry contained in
    the CPU's name wins, else CodeCarbon's 85 W default."""
    wanted = f" {_normalise(cpu_name)} "
    best: tuple[int, float, str] | None = None
    with open(data_dir / "codecarbon" / "cpu_power.csv", encoding="utf-8-sig", newline="") as f:
        for row in csv.DictReader(f):
            entry = _normalise(row["Name"])
            if entry and f" {entry} " in wanted and (best is None or len(entry) > best[0]):
                best = (len(entry), float(row["TDP"]), row["Name"])
    if best is None:
        return FALLBACK_CPU_TDP_W, "not in CodeCarbon's table: its 85 W default"
    return best[1], best[2]


def gpu_rated_power(gpu_name: str, data_dir: Path = DEFAULT_CARBON_DATA) -> tuple[float, str] | None:
    """(TDP in W, entry) from the ML Impact calculator's gpus.csv: the entry sharing most words with the name."""
    words = set(re.findall(r"[a-z0-9]+", gpu_name.lower()))
    pieces = set(re.findall(r"[a-z]+|\d+", gpu_name.lower()))  # "sxm4" -> sxm, 4; "80gb" -> 80, gb
    best: tuple[int, float, str] | None = None
    with open(data_dir / "mlco2-impact" / "data" / "gpus.csv", encoding="utf-8-sig", newline="") as f:
        for row in csv.DictReader(f):
            entry_words = re.findall(r"[a-z0-9]+", row["name"].lower())
            # The entry's model number (its first word with a digit: a100, v100, 3090) must be in the name.
            model = next((w for w in entry_words if re.search(r"\d", w)), None)
            if model is None or model not in words:
                continue
            overlap = len(set(re.findall(r"[a-z]+|\d+", row["name"].lower())) & pieces)
            if best is None or overlap > best[0]:
                best = (overlap, float(row["tdp_watts"]), row["name"])
    return (best[1], best[2]) if best else None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------------------------
# Counters


def rapl_packages(root: Path = RAPL_ROOT) -> list[Path]:
    """Readable top-level RAPL domains (intel-rapl:0, :1, ...; their sub-domains would count twice)."""
    found = []
    for domain in sorted(root.glob("intel-rapl:*")):
        if re.fullmatch(r"intel-rapl:\d+", domain.name):
            try:
                int((domain / "energy_uj").read_text())
                found.append(domain)
            except (OSError, ValueError):  # not readable without root on most machines
                continue
    return found


def _rapl_read(domains: list[Path]) -> list[int]:
    return [int((d / "energy_uj").read_text()) for d in domains]


def _rapl_joules(domains: list[Path], start: list[int], end: list[int]) -> float:
    total = 0
    for domain, a, b in zip(domains, start, end):
        if b < a:  # the counter wrapped around
            b += int((domain / "max_energy_range_uj").read_text())
        total += b - a
    return total / 1e6


class EnergyTracker:
    """`with EnergyTracker(region=...) as tracker: ...` then `tracker.result()` (a JSON-able dict).

    Tracks the CPU (RAPL or TDP) and, when `gpus` is true and CUDA is there, the GPUs (NVML or TDP).
    """

    def __init__(self, region: str | None = None, data_dir: str | Path = DEFAULT_CARBON_DATA,
                 rapl_root: str | Path = RAPL_ROOT, gpus: bool = True) -> None:
        self.data_dir = Path(data_dir)
        self.intensity, self.intensity_source = carbon_intensity(region, self.data_dir)
        self.region = region
        self.rapl = rapl_packages(Path(rapl_root))
        self.gpu_handles = self._nvml_handles() if gpus else []
        self.gpu_names = self._gpu_names() if gpus else []
        self.start_time: float | None = None
        self.seconds = 0.0

    @staticmethod
    def _nvml_handles() -> list[Any]:
        try:
            import pynvml
        except ImportError:  # no pynvml: fall back to the rated power
            return []
        try:
            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            for h in handles:  # GPUs before Volta have no energy counter
                pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
            return handles
        except pynvml.NVMLError:
            return []

    @staticmethod
    def _gpu_names() -> list[str]:
        import torch

        if not torch.cuda.is_available():
            return []
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]

    def _nvml_read(self) -> list[int]:
        import pynvml

        return [pynvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self.gpu_handles]  # millijoules

    def __enter__(self) -> EnergyTracker:
        self.start_time = time.perf_counter()
        self._rapl_start = _rapl_read(self.rapl)
        self._nvml_start = self._nvml_read() if self.gpu_handles else []
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self.start_time is not None, "EnergyTracker used outside its with block"
        self.seconds += time.perf_counter() - self.start_time
        self._rapl_joules = _rapl_joules(self.rapl, self._rapl_start, _rapl_read(self.rapl))
        self._nvml_joules = (sum(self._nvml_read()) - sum(self._nvml_start)) / 1e3 if self.gpu_handles else 0.0

    def result(self) -> dict[str, Any]:
        """hardware, method, hours, kwh, kg_co2eq, region and the carbon intensity used."""
        hours = self.seconds / 3600
        cpu = cpu_name()
        if self.rapl:
            cpu_kwh, cpu_method = self._rapl_joules / 3.6e6, "RAPL counters"
        else:
            tdp, entry = cpu_rated_power(cpu, self.data_dir)
            cpu_kwh, cpu_method = tdp * hours / 1000, f"rated power {tdp:.0f} W ({entry}) x time"
        parts = [{"hardware": cpu, "kind": "cpu", "kwh": cpu_kwh, "method": cpu_method}]
        if self.gpu_handles:
            parts.append({"hardware": ", ".join(self.gpu_names), "kind": "gpu",
                          "kwh": self._nvml_joules / 3.6e6, "method": "NVML energy counter"})
        elif self.gpu_names:
            for name in self.gpu_names:
                rated = gpu_rated_power(name, self.data_dir)
                if rated is None:
                    parts.append({"hardware": name, "kind": "gpu", "kwh": None,
                                  "method": "not measured: no NVML and not in the ML Impact calculator's table"})
                else:
                    parts.append({"hardware": name, "kind": "gpu", "kwh": rated[0] * hours / 1000,
                                  "method": f"rated power {rated[0]:.0f} W ({rated[1]}) x time"})
        kwh = sum(p["kwh"] for p in parts if p["kwh"] is not None)
        return {
            "hardware": " + ".join(p["hardware"] for p in parts),
            "parts": parts,
            "hours": hours,
            "kwh": kwh,
            "region": self.region or "unknown",
            "carbon_intensity_g_per_kwh": self.intensity,
            "carbon_intensity_source": self.intensity_source,
            "kg_co2eq": kwh * self.intensity / 1000,
        }
