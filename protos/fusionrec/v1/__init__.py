"""Generated gRPC code for fusionrec.v1 (protos/fusionrec/v1/recommender.proto; regenerate with `make proto`)."""
