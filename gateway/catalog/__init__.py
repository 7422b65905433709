"""What upstreams offer: naming and merging, URI templates, pins and the poisoning scan."""
