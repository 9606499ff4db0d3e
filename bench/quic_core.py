"""QUIC implementations' own cost, side by side: one stream of `--megabytes` between a client
and a server connection in one process, their datagrams handed across in memory (no socket, no
loop, no path), CPU time measured for each side.

What it separates: the per-packet cost of the QUIC library itself, which bench/peer_connections.py
measures together with the path, the loop and the NATs. Compared in one run:

- aioquic (the agent's), 1,350-byte packets (the agent's MAX_PACKET) and 1,452-byte ones (the
  largest a 1,500-byte IPv6 path carries whole);
- qh3 (a fork of aioquic with a Rust core), the same two sizes, when it is importable. It is not
  a dependency: `pip install qh3` to include it. Its server cannot ask for a client
  certificate, which the agent's pinned mutual authentication needs; here the client is not
  authenticated at all, so qh3 is measured for speed only.

    .venv/bin/python bench/quic_core.py [--megabytes 32] [--repeat 3]

Prints its figures; not a test.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ADDRESS = ("192.0.2.1", 4433)
CHUNK = 256 * 1024


def certificate(directory: Path) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("bench")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_file), str(key_file)


class Side:
    """One connection and the CPU time spent in its calls."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.cpu = 0.0

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        started = time.process_time()
        try:
            return getattr(self.connection, method)(*args, **kwargs)
        finally:
            self.cpu += time.process_time() - started


def transfer(library: str, packet: int, megabytes: int, cert: tuple[str, str]) -> dict:
    configuration = importlib.import_module(f"{library}.quic.configuration").QuicConfiguration
    connection = importlib.import_module(f"{library}.quic.connection").QuicConnection
    events = importlib.import_module(f"{library}.quic.events")
    common = {"alpn_protocols": ["bench"], "max_datagram_size": packet}
    client_configuration = configuration(is_client=True, server_name="bench", **common)
    client_configuration.verify_mode = 0  # ssl.CERT_NONE: speed only (module docstring)
    server_configuration = configuration(is_client=False, **common)
    server_configuration.load_cert_chain(*cert)
    client = Side(connection(configuration=client_configuration))
    packet_module = importlib.import_module(f"{library}.quic.packet")
    buffer = importlib.import_module("aioquic.buffer" if library == "aioquic" else "qh3._hazmat")
    payload = bytes(megabytes * 1024 * 1024)
    now = 0.0
    client.call("connect", ADDRESS, now=now)
    first = client.call("datagrams_to_send", now=now)
    header = packet_module.pull_quic_header(buffer.Buffer(data=first[0][0]), host_cid_length=8)
    server = Side(
        connection(
            configuration=server_configuration,
            original_destination_connection_id=header.destination_cid,
        )
    )
    for data, _ in first:
        server.call("receive_datagram", data, ADDRESS, now=now)
    stream_id: int | None = None
    offset = received = packets = 0
    while received < len(payload):
        moved = False
        for sender, receiver in ((client, server), (server, client)):
            for data, _ in sender.call("datagrams_to_send", now=now):
                receiver.call("receive_datagram", data, ADDRESS, now=now)
                packets += sender is client
                moved = True
        while (event := server.connection.next_event()) is not None:
            if isinstance(event, events.StreamDataReceived):
                received += len(event.data)
        while (event := client.connection.next_event()) is not None:
            if isinstance(event, events.HandshakeCompleted):
                stream_id = client.connection.get_next_available_stream_id()
        if stream_id is not None and offset < len(payload):
            client.call("send_stream_data", stream_id, payload[offset : offset + CHUNK])
            offset += CHUNK
            moved = True
        now += 0.0001 if moved else 0.0
        if not moved:  # both idle: the earlier timer
            timers = [t for t in (client.call("get_timer"), server.call("get_timer")) if t]
            now = max(now, min(timers))
            for side in (client, server):
                if side.connection.get_timer() and side.connection.get_timer() <= now:
                    side.call("handle_timer", now=now)
    mb = len(payload) / 1e6
    return {
        "sender_cpu_s_per_mb": client.cpu / mb,
        "receiver_cpu_s_per_mb": server.cpu / mb,
        "packets_per_mb": packets / mb,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--megabytes", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    libraries = ["aioquic"]
    try:
        importlib.import_module("qh3")
        libraries.append("qh3")
    except ImportError:
        print("qh3 is not installed: aioquic only")
    print(
        "| library | packet (bytes) | sender CPU-s per MB (median) | receiver CPU-s per MB | "
        "packets per MB |\n|---|---|---|---|---|"
    )
    with tempfile.TemporaryDirectory() as tmp:
        cert = certificate(Path(tmp))
        for library in libraries:
            for packet in (1350, 1452):
                runs = [transfer(library, packet, args.megabytes, cert) for _ in range(args.repeat)]
                version = importlib.import_module(library).__version__
                print(
                    f"| {library} {version} | {packet} | "
                    f"{statistics.median(r['sender_cpu_s_per_mb'] for r in runs):.4f} | "
                    f"{statistics.median(r['receiver_cpu_s_per_mb'] for r in runs):.4f} | "
                    f"{statistics.median(r['packets_per_mb'] for r in runs):.0f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
