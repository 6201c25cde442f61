# SPDX-License-Identifier: MIT OR Apache-2.0
"""A minimal NBD client for test-nbdkit-plugin.sh (fixed newstyle, NBD_OPT_GO, simple replies).

It sends what qemu-io and nbdinfo cannot: NBD_CMD_CACHE, requests on two connections in a chosen
order, and it returns the raw NBD error code of each reply. Standard library only."""
import socket
import struct

CMD = {"read": 0, "write": 1, "flush": 3, "trim": 4, "cache": 5, "zero": 6}
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_CACHE = 1 << 10
EPERM, EIO = 1, 5


class Conn:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        assert self.recv(16) == b"NBDMAGICIHAVEOPT", "not an NBD newstyle server"
        self.recv(2)  # handshake flags
        self.s.sendall(struct.pack(">I", 1))  # NBD_FLAG_C_FIXED_NEWSTYLE
        # NBD_OPT_GO, export name "", no information requests
        self.s.sendall(struct.pack(">QIIIH", 0x49484156454F5054, 7, 6, 0, 0))
        self.size = self.flags = None
        while True:
            _, _, rtype, length = struct.unpack(">QIII", self.recv(20))
            data = self.recv(length)
            if rtype == 1:  # NBD_REP_ACK
                break
            assert rtype == 3, "option reply %#x" % rtype  # NBD_REP_INFO
            if struct.unpack(">H", data[:2])[0] == 0:  # NBD_INFO_EXPORT
                self.size, self.flags = struct.unpack(">QH", data[2:12])
        assert self.flags is not None, "no NBD_INFO_EXPORT"
        self.handle = 0

    def recv(self, n):
        b = b""
        while len(b) < n:
            c = self.s.recv(n - len(b))
            assert c, "the server closed the connection"
            b += c
        return b

    def cmd(self, name, off=0, length=0, data=b"", fua=False):
        """Sends one request and waits for its reply: (NBD error code, data read)."""
        self.handle += 1
        if name == "write":
            length = len(data)
        hdr = struct.pack(">IHHQQI", 0x25609513, 1 if fua else 0, CMD[name], self.handle, off, length)
        self.s.sendall(hdr + (data if name == "write" else b""))
        magic, err, handle = struct.unpack(">IIQ", self.recv(16))
        assert magic == 0x67446698 and handle == self.handle, "bad reply header"
        return err, (self.recv(length) if name == "read" and err == 0 else b"")
