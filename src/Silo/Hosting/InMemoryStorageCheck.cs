using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using Orleans.Storage;
using OrleansIdempotency.Grains;
using OrleansIdempotency.Silo.Storage;

namespace OrleansIdempotency.Silo.Hosting;

/// <summary>
/// Lets the embedded default (records in this process's memory) start only where it is meant to: in Development, or
/// where <c>Orleans:AllowInMemoryRecords</c> says so. A deployment whose <c>ConnectionStrings:Postgres</c> failed to
/// reach it (a secret not mounted, a misspelt name) would otherwise serve every key from memory, forget them all on
/// restart and share none with its other replicas, running retried actions again, with nothing but a warning.
/// </summary>
internal sealed partial class InMemoryStorageCheck(
    IServiceProvider services, IHostEnvironment environment, IConfiguration configuration, ILogger<InMemoryStorageCheck> logger)
    : ILifecycleParticipant<ISiloLifecycle>
{
    /// <summary>The setting that allows in-memory records outside Development.</summary>
    public const string AllowSetting = "Orleans:AllowInMemoryRecords";

    // First of all the silo's start, so that a refused silo never joins a cluster or takes a request.
    public void Participate(ISiloLifecycle lifecycle) => lifecycle.Subscribe(nameof(InMemoryStorageCheck), ServiceLifecycleStage.First, Check);

    private Task Check(CancellationToken cancellationToken)
    {
        // The storage the grains will use, not the configuration's account of it: a host may add PostgreSQL itself.
        if (services.GetKeyedService<IGrainStorage>(IdempotencyGrain.StorageName) is not InMemoryRecordStorage)
        {
            return Task.CompletedTask;
        }

        if (!environment.IsDevelopment() && !configuration.GetValue<bool>(AllowSetting))
        {
            throw new InvalidOperationException(
                $"ConnectionStrings:Postgres is not set in the {environment.EnvironmentName} environment, so idempotency records would be kept " +
                "in this process's memory: lost on restart and not shared with other processes. Set ConnectionStrings__Postgres " +
                $"(and ConnectionStrings__Redis for several silos), or {AllowSetting.Replace(":", "__", StringComparison.Ordinal)}=true " +
                "to run the in-memory embedded default here all the same.");
        }

        LogInMemory(logger);
        return Task.CompletedTask;
    }

    [LoggerMessage(Level = LogLevel.Warning, Message =
        "Idempotency records are kept in this process's memory until they expire: keys do not survive a restart and are " +
        "not shared with other processes. " +
        "Set ConnectionStrings__Postgres (and ConnectionStrings__Redis for several silos) for durable idempotency.")]
    private static partial void LogInMemory(ILogger logger);
}
