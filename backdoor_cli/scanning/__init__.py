"""Scanning: trigger inversion per class with a MAD outlier test, and the scan that guides purify.

- inversion: Neural-Cleanse-style trigger inversion and the anomaly index
- guided: purify's default - the scan that chooses what to unlearn, the proxy ASR, the re-scan
- cache: scans kept by what they depend on, so a second purify of the same model and images skips the search
"""

from .cache import ScanCache, open_scan_cache
from .guided import ScanEvidence, choose_triggers, proxy_rates, rescan, run_scan
from .inversion import ClassTrigger, InversionParams, ScanResult

__all__ = [
    "ClassTrigger",
    "InversionParams",
    "ScanCache",
    "ScanEvidence",
    "ScanResult",
    "choose_triggers",
    "open_scan_cache",
    "proxy_rates",
    "rescan",
    "run_scan",
]
