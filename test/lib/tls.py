"""Certificates for the TLS tests: a throwaway CA and a server certificate
for 127.0.0.1 signed by it, made with the openssl command in a private
directory that the PostgreSQL server (user postgres) can read."""
import os
import ssl
import subprocess
import tempfile


class ThrowawayCA:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="notify_ext_tls_")
        os.chmod(self.dir, 0o755)
        self.ca_key = os.path.join(self.dir, "ca.key")
        self.ca_cert = os.path.join(self.dir, "ca.crt")
        self.key = os.path.join(self.dir, "server.key")
        self.cert = os.path.join(self.dir, "server.crt")
        ext = os.path.join(self.dir, "san.ext")
        with open(ext, "w") as f:
            f.write("subjectAltName = IP:127.0.0.1, DNS:localhost\n")

        def run(*args):
            subprocess.run(["openssl", *args], check=True, capture_output=True)
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=notify_ext test CA", "-keyout", self.ca_key, "-out", self.ca_cert)
        csr = os.path.join(self.dir, "server.csr")
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", self.key, "-out", csr)
        run("x509", "-req", "-in", csr, "-CA", self.ca_cert, "-CAkey", self.ca_key,
            "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", self.cert)
        for p in (self.ca_cert, self.cert):
            os.chmod(p, 0o644)

    def server_context(self):
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx
