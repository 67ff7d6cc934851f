"""Energy tracking with fake RAPL counters, and the real carbon and power tables."""

from __future__ import annotations

import pytest

from distillery.evaluate import energy
from distillery.models.common import DistilleryError


@pytest.fixture
def carbon(shared_data):
    return shared_data / "carbon"


def _domain(root, name, uj, max_uj=1_000_000_000):
    d = root / name
    d.mkdir(parents=True)
    (d / "energy_uj").write_text(f"{uj}\n")
    (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return d


def test_rapl_counts_packages_only_and_handles_wraparound(tmp_path, carbon):
    pkg0 = _domain(tmp_path, "intel-rapl:0", 900_000_000)
    pkg1 = _domain(tmp_path, "intel-rapl:1", 5_000_000)
    sub = _domain(tmp_path, "intel-rapl:0:0", 1_000)  # the core sub-domain: inside package 0 already
    with energy.EnergyTracker(region="FRA", data_dir=carbon, rapl_root=tmp_path, gpus=False) as tracker:
        (pkg0 / "energy_uj").write_text("100000000\n")  # wrapped: 100 J past the 1000 J range
        (pkg1 / "energy_uj").write_text("41000000\n")  # +36 J
        (sub / "energy_uj").write_text("999000000\n")
    result = tracker.result()
    joules = (1_000_000_000 - 900_000_000 + 100_000_000) / 1e6 + 36.0
    assert result["kwh"] == pytest.approx(joules / 3.6e6)
    assert result["parts"][0]["method"] == "RAPL counters"
    assert result["kg_co2eq"] == pytest.approx(result["kwh"] * result["carbon_intensity_g_per_kwh"] / 1000)
    assert result["region"] == "FRA" and "France" in result["carbon_intensity_source"]


def test_estimate_from_rated_power_without_rapl(tmp_path, carbon, monkeypatch):
    monkeypatch.setattr(energy, "cpu_name", lambda: "Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz")
    with energy.EnergyTracker(region="azure:eastus", data_dir=carbon, rapl_root=tmp_path, gpus=False) as tracker:
        pass
    tracker.seconds = 7200.0  # two hours at 150 W
    result = tracker.result()
    assert result["kwh"] == pytest.approx(0.3)
    assert result["carbon_intensity_g_per_kwh"] == 367.8  # the calculator's Azure East US
    assert result["kg_co2eq"] == pytest.approx(0.3 * 0.3678)
    assert "150 W (Intel Xeon Gold 6148)" in result["parts"][0]["method"]


def test_tables(carbon):
    assert energy.cpu_rated_power("AMD EPYC 7763 64-Core Processor", carbon) == (280.0, "AMD EPYC 7763")
    assert energy.cpu_rated_power("Mystery CPU 9000", carbon)[0] == energy.FALLBACK_CPU_TDP_W
    assert energy.gpu_rated_power("Tesla V100-SXM2-16GB", carbon) == (250.0, "Tesla V100-SXM2-16GB")
    assert energy.gpu_rated_power("NVIDIA A100-SXM4-80GB", carbon) == (400.0, "A100 SXM4 80 GB")
    assert energy.gpu_rated_power("NVIDIA GeForce RTX 3090", carbon) == (350.0, "RTX 3090")
    assert energy.gpu_rated_power("Some Future GPU", carbon) is None
    assert energy.carbon_intensity(None, carbon)[0] == 475.0
    # The DistilGPT2 card: 8 V100 (calculator: 250 W), 168 h, East US -> 8*0.25*168 kWh * 0.3678 kg/kWh
    intensity, _ = energy.carbon_intensity("azure:eastus", carbon)
    assert 8 * 0.25 * 168 * intensity / 1000 == pytest.approx(123.6, abs=0.1)


@pytest.mark.parametrize("region", ["azure:mars-1", "XYZ"])
def test_unknown_region(carbon, region):
    with pytest.raises(DistilleryError, match=f"region {region!r}"):
        energy.carbon_intensity(region, carbon)
