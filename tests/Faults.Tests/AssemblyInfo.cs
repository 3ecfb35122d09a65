// One scenario at a time: each starts a whole cluster of processes, and its timing assertions (leases of seconds,
// a fault while load is still running) mean something only if it has the machine's two cores to itself.
[assembly: CollectionBehavior(DisableTestParallelization = true)]
