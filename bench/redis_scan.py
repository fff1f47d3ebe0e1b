#!/usr/bin/env python3
"""A whole-keyspace SCAN of a redis database, page after page (SCAN cursor COUNT n), as one
client: the redis side of the scan row of bench/compare.sh (redis-cli --scan has no --count
before 7.2). Prints "keys seconds p50_us p99_us" (latencies per page).

    bench/redis_scan.py PORT DB COUNT
"""
import socket
import sys
import time


def command(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class Reader:
    def __init__(self, sock):
        self.sock, self.buf, self.pos = sock, b"", 0

    def line(self):
        while True:
            end = self.buf.find(b"\r\n", self.pos)
            if end >= 0:
                line, self.pos = self.buf[self.pos:end], end + 2
                return line
            self.fill()

    def exactly(self, n):
        while len(self.buf) - self.pos < n + 2:
            self.fill()
        data, self.pos = self.buf[self.pos:self.pos + n], self.pos + n + 2
        return data

    def fill(self):
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise SystemExit("redis closed the connection")
        self.buf, self.pos = self.buf[self.pos:] + chunk, 0

    def reply(self):
        line = self.line()
        kind, rest = line[:1], line[1:]
        if kind in (b"+", b":"):
            return rest
        if kind == b"-":
            raise SystemExit("redis: " + rest.decode())
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.exactly(n)
        if kind == b"*":
            return [self.reply() for _ in range(int(rest))]
        raise SystemExit("unexpected reply %r" % line)


def main():
    port, db, count = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = Reader(sock)
    sock.sendall(command("SELECT", db))
    reader.reply()
    keys, pages, cursor = 0, [], b"0"
    started = time.perf_counter()
    while True:
        asked = time.perf_counter()
        sock.sendall(command("SCAN", cursor, "COUNT", count))
        cursor, batch = reader.reply()
        pages.append(time.perf_counter() - asked)
        keys += len(batch)
        if cursor == b"0":
            break
    elapsed = time.perf_counter() - started
    pages.sort()
    pct = lambda q: int(pages[min(len(pages) - 1, int(q * len(pages)))] * 1e6)
    print(keys, "%.3f" % elapsed, pct(0.5), pct(0.99))


if __name__ == "__main__":
    main()
