using Microsoft.Extensions.DependencyInjection.Extensions;

namespace OrleansIdempotency.AspNetCore;

/// <summary>Registers the idempotency layer.</summary>
public static class IdempotencyServiceCollectionExtensions
{
    /// <summary>Adds the idempotency layer's services. It needs an Orleans silo or client in the same host.</summary>
    public static IServiceCollection AddIdempotency(this IServiceCollection services) => services.AddIdempotency(_ => { });

    /// <inheritdoc cref="AddIdempotency(IServiceCollection)"/>
    public static IServiceCollection AddIdempotency(this IServiceCollection services, Action<IdempotencyOptions> configure)
    {
        services.AddOptions<IdempotencyOptions>().Configure(configure).Validate(o =>
        {
            o.DefaultPolicy.Validate();
            return o.ClusterRetryBudget > TimeSpan.Zero && o.ReplayCacheBytes >= 0;
        });
        services.TryAddSingleton(TimeProvider.System);
        services.TryAddSingleton<IdempotencyGrainCalls>();
        services.TryAddSingleton<IdempotencyProblems>();
        services.TryAddSingleton<IdempotencyMetrics>();
        services.TryAddSingleton<ReplayCache>();
        services.TryAddSingleton<Once.IOnceExecutor, Once.OnceExecutor>();
        services.TryAddSingleton<Once.OnceHttp>();
        services.TryAddSingleton<IdempotencyKeysHttp>();
        return services;
    }
}
