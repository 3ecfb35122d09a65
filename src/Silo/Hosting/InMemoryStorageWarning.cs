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
        "Idempotency records are kept in memory: keys do not survive a restart, are not shared with other processes, " +
        "and are never freed, expired or not (about 1 KB each, plus the stored response). " +
        "Set ConnectionStrings__Postgres (and ConnectionStrings__Redis for several silos) for durable idempotency.")]
    private static partial void LogInMemory(ILogger logger);
}
