"""tessera's Ray Serve application: `serve run serve.app:build_app bundle=<URI>`.

args.py      typed application arguments (`build_app(args)` validates them here)
api.py       the HTTP API's request schema, limits and OpenAI-shaped errors (no Ray)
images.py    PNG encoding and the bounded store behind `response_format=url`
generator.py the model deployment: one bundle per replica, batched generation
app.py       the FastAPI ingress deployment and `build_app`
index.html   the web page served at `/`
"""
