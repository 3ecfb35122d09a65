using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;

namespace OrleansIdempotency.Silo.Hosting;

/// <summary>Says, once at start, that the embedded default forgets every key on restart.</summary>
internal sealed partial class InMemoryStorageWarning(ILogger<InMemoryStorageWarning> logger) : IHostedService
{
    public Task StartAsync(CancellationToken cancellationToken)
    {
        LogInMemory(logger);
        return Task.CompletedTask;
    }

    public Task StopAsync(CancellationToken cancellationToken) => Task.CompletedTask;

    [LoggerMessage(Level = LogLevel.Warning, Message =
        "Idempotency records are kept in this process's memory until they expire: keys do not survive a restart and are " +
        "not shared with other processes. " +
        "Set ConnectionStrings__Postgres (and ConnectionStrings__Redis for several silos) for durable idempotency.")]
    private static partial void LogInMemory(ILogger logger);
}
