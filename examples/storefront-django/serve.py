"""Storefront demo on Django: the cart and login of examples/storefront (axum) and
examples/storefront-flask, the same HTTP contract, with Django's sessions in sessiond
(SESSION_ENGINE = "sessiond_client.django") and django.contrib.auth's login() and logout().
All the storefronts can share one sessiond and serve one visitor's session in turn.

Configuration (environment): SESSIOND_ADDR (127.0.0.1:7420 or http://127.0.0.1:7420),
SESSIOND_TOKEN (multi-tenant sessiond), PORT (0 = ephemeral), STOREFRONT_IDLE_TIMEOUT_SECONDS
(idle timeout of new sessions), DJANGO_SECRET_KEY. The users live in a SQLite file made at
start-up and removed at exit. Prints `listening on http://127.0.0.1:PORT` once it accepts
connections; SIGTERM or SIGINT stops it.

Run:  SESSIOND_ADDR=127.0.0.1:7420 PORT=8080 target/python-venv/bin/python examples/storefront-django/serve.py
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
from pathlib import Path


def main() -> int:
    port = int(os.environ.get("PORT") or "8080")
    idle = os.environ.get("STOREFRONT_IDLE_TIMEOUT_SECONDS")
    if idle and not (idle.isdigit() and int(idle) > 0):
        print("STOREFRONT_IDLE_TIMEOUT_SECONDS must be a positive whole number", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="storefront-django-") as db_dir:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        os.environ["DJANGO_SETTINGS_MODULE"] = "storefront.settings"
        os.environ["STOREFRONT_DB"] = str(Path(db_dir) / "users.sqlite3")

        import django
        from django.core.management import call_command
        from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler
        from django.core.wsgi import get_wsgi_application

        django.setup()
        call_command("migrate", run_syncdb=True, verbosity=0)

        # Django's runserver machinery: a thread per request.
        server = ThreadedWSGIServer(("127.0.0.1", port), WSGIRequestHandler)
        server.set_app(get_wsgi_application())

        def stop(*_):
            threading.Thread(target=server.shutdown, daemon=True).start()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        print(f"listening on http://127.0.0.1:{server.server_port}", flush=True)
        try:
            server.serve_forever()
        finally:
            server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
