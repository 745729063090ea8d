"""A real GCS-protocol server for the tests: gcp-storage-emulator on 127.0.0.1, a free port.

``gcs_emulator()`` runs the emulator (in memory) in a subprocess that binds port 0 and
prints the port it got, and writes a throwaway service-account key.  The emulator checks
no credentials, but pyarrow's GCS client (google-cloud-cpp) needs some: without any it
asks the GCE metadata server for a token.  With a service-account key it signs its own
token, offline.  MLflow's client (google-cloud-storage) goes anonymous when
``STORAGE_EMULATOR_HOST`` is set.  The server is stopped by its pid.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from procs import terminate

_SERVE = """
import sys, time
from gcp_storage_emulator.server import create_server
server = create_server("127.0.0.1", 0, in_memory=True)
server.start()
print("listening on", server._api._httpd.server_address[1], flush=True)
while True:
    time.sleep(3600)
"""


@dataclass
class GCSServer:
    endpoint: str
    key_file: str

    def env(self) -> dict[str, str]:
        """The variables a user sets for a GCS emulator (docs/distributed.md)."""
        return {"CLOUD_STORAGE_EMULATOR_ENDPOINT": self.endpoint, "STORAGE_EMULATOR_HOST": self.endpoint,
                "GOOGLE_APPLICATION_CREDENTIALS": self.key_file}

    def client(self):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage
        return storage.Client(project="test", credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.endpoint})

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object name under the prefix."""
        return [b.name for b in self.client().list_blobs(bucket, prefix=prefix)]


def write_service_account_key(path: Path | str) -> None:
    """A throwaway service-account key (a fresh RSA key): enough for google-cloud-cpp to sign its own tokens."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    Path(path).write_text(json.dumps({
        "type": "service_account", "project_id": "test", "private_key_id": "kdray-test", "private_key": pem,
        "client_email": "kdray@test.iam.gserviceaccount.com", "client_id": "1",
        "token_uri": "http://127.0.0.1:9/token"}))     # never asked: the client signs its own token


@contextmanager
def gcs_emulator():
    with tempfile.TemporaryDirectory(prefix="kdray-gcs-") as d:
        key_file = Path(d) / "service-account.json"
        write_service_account_key(key_file)
        proc = subprocess.Popen([sys.executable, "-c", _SERVE], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=d)
        try:
            port = None
            lines = []
            for line in proc.stdout:
                lines.append(line)
                if line.startswith("listening on "):
                    port = int(line.split()[-1])
                    break
            if port is None:
                raise RuntimeError(f"gcp-storage-emulator exited with {proc.wait()} before listening: "
                                   + "".join(lines)[-2000:])
            # Keep reading its log, or the pipe fills and the server blocks.
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            yield GCSServer(f"http://127.0.0.1:{port}", str(key_file))
        finally:
            terminate(proc)
