"""Put the two Kafka connector jars the Flink job needs into ``<venv>/jars`` (stdlib only).

``apache-flink`` ships no Kafka connector. The third-party wheel
``shigawire-apache-flink-libraries`` carries ``flink-connector-kafka`` 4.0.1 and
``kafka-clients`` 3.9.1, verified to work with Flink 2.3.0 -- but installing that wheel would
also drop its Flink 2.0 jars into ``pyflink/lib`` and break 2.3.0 (``NoSuchMethodError ...
IntervalFreshness.fromDuration``). So we download it without installing and extract only the
two jars, checking their digests so a re-published wheel cannot slip in other bytes.

    .venv-flink/bin/python streams/flink/setup_jars.py --venv .venv-flink
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "shigawire-apache-flink-libraries==2.0.0.post1"
#: jar inside the wheel -> sha256 of the version verified with Flink 2.3.0 here
JARS: dict[str, str] = {
    "pyflink/lib/flink-connector-kafka.jar": "842885a51c768b2f31c946a2071656c166ee8cc6d3c02fe6c557e134e03bf228",
    "pyflink/lib/kafka-clients.jar": "7568b998572d256f0b7bc0afdc1b7a2588b8b08415c62ce314c864a6851ae9d9",
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def have_jars(dest: Path) -> bool:
    return all((dest / Path(j).name).exists() and _sha256(dest / Path(j).name) == h for j, h in JARS.items())


def install(dest: Path, python: str = sys.executable) -> None:
    if have_jars(dest):
        return
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([python, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, WHEEL], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            for name, digest in JARS.items():
                data = zf.read(name)
                got = hashlib.sha256(data).hexdigest()
                if got != digest:
                    raise SystemExit(f"{name} in {wheel.name}: sha256 {got} != expected {digest}")
                (dest / Path(name).name).write_bytes(data)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", type=Path, default=Path(".venv-flink"))
    a = ap.parse_args(argv)
    install(a.venv / "jars")
    print(f"Kafka connector jars in {a.venv / 'jars'}")


if __name__ == "__main__":
    main()
