"""`python tests/support/digest_server.py PORT`: a TCP server on 127.0.0.1:PORT that answers each
connection, once the client has half-closed it, with the SHA-256 of what it sent (hex). Run as a
process of its own, so that it can run inside a network namespace (`ip netns exec`); prints
`listening` once it accepts. A forward that lost the half-close, or a byte, shows in the digest.
"""

import hashlib
import socket
import sys

if __name__ == "__main__":
    server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
    print("listening", flush=True)
    while True:
        client, _ = server.accept()
        digest = hashlib.sha256()
        while data := client.recv(1 << 20):
            digest.update(data)
        client.sendall(digest.hexdigest().encode())
        client.close()
