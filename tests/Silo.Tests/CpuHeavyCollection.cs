namespace OrleansIdempotency.Silo.Tests;

/// <summary>
/// Tests that keep both cores busy (dedicated writer threads, thousands of rounds), run on their own after the rest:
/// beside them, the silos' tests' timings (probes, leases) stretched on this 2-core machine.
/// </summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class CpuHeavyCollection
{
    public const string Name = "cpu-heavy";
}
