namespace OrleansIdempotency.Api;

/// <summary><c>GET /health</c>: whether this process reaches the cluster, how many silos are active, how many grains are activated.</summary>
public static class ClusterHealthEndpoints
{
    public static IEndpointRouteBuilder MapClusterHealth(this IEndpointRouteBuilder app)
    {
        app.MapGet("/health", async (IGrainFactory grains, CancellationToken cancellationToken) =>
        {
            try
            {
                var management = grains.GetGrain<IManagementGrain>(0);
                var hosts = await management.GetHosts(onlyActive: true, cancellationToken).WaitAsync(TimeSpan.FromSeconds(5), cancellationToken);
                var activations = await management.GetTotalActivationCount(cancellationToken).WaitAsync(TimeSpan.FromSeconds(5), cancellationToken);
                // The managed heap as the last garbage collection left it: live data, not what the process has reserved.
                return Results.Ok(new { status = "ok", activeSilos = hosts.Count, activations, managedHeapBytes = GC.GetGCMemoryInfo().HeapSizeBytes });
            }
            catch (Exception ex) when (ex is not OperationCanceledException)
            {
                return Results.Problem(statusCode: 503, title: "Cluster unreachable", detail: ex.Message);
            }
        });
        return app;
    }
}
