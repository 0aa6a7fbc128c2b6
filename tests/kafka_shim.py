"""A loopback TCP relay that lets librdkafka 2.0.2 (Debian's kcat) talk to the development broker.

Broker deviation met here: in ApiVersions v3 responses the development broker
writes every tagged field (SupportedFeatures, FinalizedFeaturesEpoch = -1,
FinalizedFeatures, ZkMigrationReady = false) even at its default value; Apache
Kafka omits default-valued tagged fields. librdkafka 2.0.2 fails to skip them
("Read underflow" on ApiVersionResponse) and never connects. The relay drops
those tagged fields from ApiVersions responses, as Apache Kafka would send them,
and passes every other byte through unchanged.
"""

from __future__ import annotations

import socket
import struct
import threading

API_VERSIONS = 18


def _read_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _frames(sock):
    while True:
        head = _read_exact(sock, 4)
        if head is None:
            return
        body = _read_exact(sock, struct.unpack(">i", head)[0])
        if body is None:
            return
        yield body


def _strip_tagged_fields(body: bytes) -> bytes:
    """ApiVersions v3 response (header v0): drop the trailing tagged fields."""
    p = 4 + 2  # correlation id, error code
    count, shift, value = 0, 0, 0
    while True:  # unsigned varint: array length + 1
        b = body[p]
        p += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    count = value - 1
    for _ in range(count):
        p += 6  # api key, min, max
        p += 1  # the entry's (empty) tagged fields
    p += 4  # throttle time
    return body[:p] + b"\x00"


class KafkaShim:
    def __init__(self, upstream: tuple[str, int], port: int):
        self.upstream = upstream
        self.server = socket.create_server(("127.0.0.1", port))
        self.port = port
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            broker = socket.create_connection(self.upstream)
            pending: dict[int, tuple[int, int]] = {}
            threading.Thread(target=self._requests, args=(client, broker, pending), daemon=True).start()
            threading.Thread(target=self._responses, args=(broker, client, pending), daemon=True).start()

    @staticmethod
    def _requests(client, broker, pending):
        try:
            for body in _frames(client):
                key, version, correlation = struct.unpack(">hhi", body[:8])
                pending[correlation] = (key, version)
                broker.sendall(struct.pack(">i", len(body)) + body)
        except OSError:
            pass
        finally:
            broker.close()

    @staticmethod
    def _responses(broker, client, pending):
        try:
            for body in _frames(broker):
                key, version = pending.pop(struct.unpack(">i", body[:4])[0], (None, None))
                if key == API_VERSIONS and version >= 3:
                    body = _strip_tagged_fields(body)
                client.sendall(struct.pack(">i", len(body)) + body)
        except OSError:
            pass
        finally:
            client.close()

    def close(self):
        self.server.close()
