namespace OrleansIdempotency.Api;

/// <summary>
/// <c>GET /health</c>: whether this process reaches the cluster, how many silos are active, how many grains are
/// activated on those that answer in time, and how many did not.
/// </summary>
public static class ClusterHealthEndpoints
{
    // Each active silo is asked apart: a silo frozen but not yet declared dead (a long GC pause, a stalled VM) would
    // otherwise hold up the whole answer, and turn every API node's health check red for one silo's stall.
    private static readonly TimeSpan SiloAnswers = TimeSpan.FromSeconds(2);

    private static readonly TimeSpan ClusterAnswers = TimeSpan.FromSeconds(5);

    public static IEndpointRouteBuilder MapClusterHealth(this IEndpointRouteBuilder app)
    {
        app.MapGet("/health", async (IGrainFactory grains, CancellationToken cancellationToken) =>
        {
            var management = grains.GetGrain<IManagementGrain>(0);
            Dictionary<SiloAddress, SiloStatus> hosts;
            try
            {
                hosts = await WithinAsync(answers => management.GetHosts(onlyActive: true, answers), ClusterAnswers, cancellationToken);
            }
            catch (Exception ex) when (!cancellationToken.IsCancellationRequested)
            {
                return Results.Problem(statusCode: 503, title: "Cluster unreachable",
                    detail: ex is OperationCanceledException ? $"The cluster did not answer within {ClusterAnswers.TotalSeconds:0} s." : ex.Message);
            }

            var counts = await Task.WhenAll(hosts.Keys.Select(silo => ActivationsOnAsync(management, silo, cancellationToken)));
            var unresponsive = counts.Count(count => count is null);
            return Results.Ok(new
            {
                status = unresponsive == 0 ? "ok" : "degraded",
                activeSilos = hosts.Count,
                unresponsiveSilos = unresponsive,
                activations = counts.Sum(count => count ?? 0),
                // The managed heap as the last garbage collection left it: live data, not what the process has reserved.
                managedHeapBytes = GC.GetGCMemoryInfo().HeapSizeBytes,
            });
        });
        return app;
    }

    // Null when the silo did not answer in time, or has gone since membership listed it.
    private static async Task<int?> ActivationsOnAsync(IManagementGrain management, SiloAddress silo, CancellationToken cancellationToken)
    {
        try
        {
            var statistics = await WithinAsync(answers => management.GetRuntimeStatistics([silo], answers), SiloAnswers, cancellationToken);
            return statistics[0].ActivationCount;
        }
        catch (Exception) when (!cancellationToken.IsCancellationRequested)
        {
            return null;
        }
    }

    // The call, cancelled at the end of its time, not only given up on: a frozen silo or a stalled gateway would
    // otherwise hold each probe's call until Orleans' own time-out.
    private static async Task<T> WithinAsync<T>(Func<CancellationToken, Task<T>> call, TimeSpan within, CancellationToken cancellationToken)
    {
        using var answers = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        answers.CancelAfter(within);
        return await call(answers.Token).WaitAsync(answers.Token);
    }
}
