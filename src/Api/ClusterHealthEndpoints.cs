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
            // Cancelled, not only given up on: a stalled gateway would otherwise hold each probe's call until Orleans' time-out.
            using var answers = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
            answers.CancelAfter(ClusterAnswers);
            try
            {
                hosts = await management.GetHosts(onlyActive: true, answers.Token).WaitAsync(answers.Token);
            }
            catch (Exception ex) when (!cancellationToken.IsCancellationRequested)
            {
                return Results.Problem(statusCode: 503, title: "Cluster unreachable",
                    detail: answers.IsCancellationRequested ? $"The cluster did not answer within {ClusterAnswers.TotalSeconds:0} s." : ex.Message);
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
        // Cancelled, not only given up on: a frozen silo would otherwise hold each probe's call until Orleans' time-out.
        using var answers = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        answers.CancelAfter(SiloAnswers);
        try
        {
            var statistics = await management.GetRuntimeStatistics([silo], answers.Token).WaitAsync(answers.Token);
            return statistics[0].ActivationCount;
        }
        catch (Exception) when (!cancellationToken.IsCancellationRequested)
        {
            return null;
        }
    }
}
