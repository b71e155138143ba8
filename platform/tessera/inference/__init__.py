"""Trained models run over data on Ray: encode (images -> tokens), batch generation, evaluation."""
