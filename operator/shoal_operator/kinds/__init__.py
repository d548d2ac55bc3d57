"""Each kind's reconcile I/O: read the cache, run the pure reconciler, carry out its plan.

The pure reconcilers (``shoal_operator.reconcilers``) decide; these modules only gather
what they need (cache, JetStream, the autoscaler's and dispatcher's figures) and hand
the outcome to the writer. One module per kind keeps a kind's I/O readable in one go.
"""
