using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Testing;
using OrleansIdempotency.Testing;

namespace OrleansIdempotency.Api.Tests.Demo;

/// <summary>The host's own settings, src/Api/appsettings.json, as a deployed process reads them.</summary>
public sealed class AppSettingsTests
{
    [Fact]
    public void LogFilters_QuietOrleans_ButKeepTheLayersOwnInformation()
    {
        // Filters match category prefixes: "Orleans" alone also quieted OrleansIdempotency.*, so a silo said nothing of
        // its schema, its purges or its service lock held again.
        var configuration = new ConfigurationBuilder().AddJsonFile(Path.Combine(Binaries.Root, "src", "Api", "appsettings.json")).Build();
        using var loggers = LoggerFactory.Create(logging => logging.AddConfiguration(configuration.GetSection("Logging")).AddProvider(new FakeLoggerProvider()));

        Assert.True(loggers.CreateLogger("OrleansIdempotency.Silo.Storage.ServiceLock").IsEnabled(LogLevel.Information));
        Assert.True(loggers.CreateLogger("OrleansIdempotency.AspNetCore.IdempotencyMiddleware").IsEnabled(LogLevel.Information));
        Assert.False(loggers.CreateLogger("Orleans.Runtime.Silo").IsEnabled(LogLevel.Information));
    }
}
