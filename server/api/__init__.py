"""The public API: the gRPC servicers (`grpc_service.py`) and the stubs generated from
`proto/elasticmoe/v1/elasticmoe.proto` (`make proto` regenerates them; a test checks them)."""
