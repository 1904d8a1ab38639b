"""A real PACS for the tests and the DICOM node benchmark: Debian's Orthanc (with its DICOMweb plugin) in the
foreground, on free loopback ports, storing into a folder of its own. `make tools` installs it."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import requests

from loadtest.server import free_port

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class Orthanc:
    """Orthanc in the foreground, on free loopback ports, storing into a temporary folder."""

    def __init__(self, root: Path, config: dict | None = None, lua: str | None = None) -> None:
        """`config`: more of Orthanc's settings (DicomModalities, ...); `lua`: a Lua script (routing callbacks)."""
        self.http_port, self.dicom_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        config = {"Name": "osteoscreen-test", "HttpPort": self.http_port, "DicomPort": self.dicom_port,
                  "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "storage"),
                  "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
                  "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
                  **(config or {})}
        if lua is not None:
            (root / "routing.lua").write_text(lua)
            config["LuaScripts"] = [str(root / "routing.lua")]
        (root / "orthanc.json").write_text(json.dumps(config))
        self.log = open(root / "orthanc.log", "w")
        self.proc = subprocess.Popen([shutil.which("Orthanc"), str(root / "orthanc.json")], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (root / "orthanc.log").read_text()[-2000:]
            try:
                if requests.get(f"{self.url}/system", timeout=2).ok:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        raise TimeoutError("Orthanc did not start")

    def store(self, data: bytes) -> dict:
        answer = requests.post(f"{self.url}/instances", data=data, timeout=60)
        assert answer.ok, answer.text
        return answer.json()

    def get(self, path: str):
        answer = requests.get(f"{self.url}{path}", timeout=60)
        assert answer.ok, (path, answer.text)
        return answer

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
