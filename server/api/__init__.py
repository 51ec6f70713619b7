"""The public API: the gRPC servicers (`grpc_service.py`) and the stubs generated from
`proto/elasticmoe/v1/elasticmoe.proto` (`make proto` regenerates them; a test checks them); the
OpenAI-compatible HTTP API (`http_service.py`: Starlette routes on uvicorn, `openai_schema.py`:
OpenAI's request and response bodies, `chat_template.py`: a checkpoint's chat template rendered as
transformers renders it); and the request rules both APIs share (`requests.py`)."""
