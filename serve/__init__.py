"""tessera's Ray Serve application: `python -m serve serve.app:build_app bundle=<URI>`.

__main__.py  `python -m serve`: `serve run` on a local Ray on 127.0.0.1 with token auth
args.py      typed application arguments (`build_app(args)` validates them here)
api.py       the HTTP API's request schema, limits and OpenAI-shaped errors (no Ray)
images.py    PNG encoding and the bounded store behind `response_format=url`
generator.py the model deployment: one bundle per replica, batched generation
app.py       the FastAPI ingress deployment and `build_app`
index.html   the web page served at `/`
app.js       its script, served at `/app.js` (the page's CSP runs no inline script)
"""

from tessera.cluster import serve_replicas_on_loopback

# A replica imports this package (unpickling its deployment class) before it opens its gRPC port.
serve_replicas_on_loopback()
