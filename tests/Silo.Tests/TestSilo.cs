using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using OrleansIdempotency.Silo.Hosting;
using OrleansIdempotency.Testing;

namespace OrleansIdempotency.Silo.Tests;

/// <summary>A silo started in this process through the same hosting code as <c>src/Silo</c>, on free ports.</summary>
public sealed class TestSilo : IAsyncDisposable
{
    private TestSilo(IHost host)
    {
        Host = host;
    }

    public IHost Host { get; }

    public IGrainFactory Grains => Host.Services.GetRequiredService<IGrainFactory>();

    public static async Task<TestSilo> StartAsync(IDictionary<string, string?> settings, Action<ISiloBuilder>? configure = null)
    {
        var builder = Microsoft.Extensions.Hosting.Host.CreateApplicationBuilder(new HostApplicationBuilderSettings { DisableDefaults = true });
        builder.Configuration.AddInMemoryCollection(FreePort.SiloEndpoints());
        builder.Configuration.AddInMemoryCollection(new Dictionary<string, string?>
        {
            // Fail over in seconds, not the production default's tens of seconds; yet not on a stall of a busy machine's
            // few seconds (one probe of 1 s missed twice declared a live silo dead).
            ["Orleans:Membership:ProbeTimeout"] = "00:00:02",
            ["Orleans:Membership:NumMissedProbesLimit"] = "3",
            ["Orleans:Membership:NumVotesForDeathDeclaration"] = "1",
            ["Orleans:Membership:TableRefreshTimeout"] = "00:00:02",
            // Its host's environment is Production; a silo without PostgreSQL is meant to keep its records in memory.
            ["Orleans:AllowInMemoryRecords"] = "true",
        });
        builder.Configuration.AddInMemoryCollection(settings);
        builder.Logging.AddFilter(level => level >= LogLevel.Warning);
        builder.UseOrleans(silo =>
        {
            silo.UseIdempotency(builder.Configuration);
            configure?.Invoke(silo);
        });
        var host = builder.Build();
        try
        {
            await host.StartAsync();
        }
        catch
        {
            // A silo refused at start must not keep its ports, its Redis entry or its lock for the rest of the run; one
            // refused before it started cannot be stopped, only disposed.
            try
            {
                await host.StopAsync(TimeSpan.FromSeconds(10));
            }
            catch (InvalidOperationException)
            {
            }

            host.Dispose();
            throw;
        }

        return new TestSilo(host);
    }

    /// <summary>Stops the silo without a graceful shutdown: it leaves the cluster the way a crashed process does, as far as an in-process host can.</summary>
    public async Task CrashAsync()
    {
        await Host.StopAsync(new CancellationToken(canceled: true));
        Host.Dispose();
    }

    public async ValueTask DisposeAsync()
    {
        try
        {
            await Host.StopAsync(TimeSpan.FromSeconds(10));
        }
        catch (ObjectDisposedException)
        {
            // Crashed already.
        }

        Host.Dispose();
    }
}

/// <summary>The settings of a test's own cluster: its database, its cluster id, shared Redis.</summary>
public static class TestClusterSettings
{
    public static async Task<Dictionary<string, string?>> CreateAsync(ServersFixture servers, bool redis = true)
    {
        var id = "test-" + Guid.NewGuid().ToString("N")[..12];
        var settings = new Dictionary<string, string?>
        {
            ["ConnectionStrings:Postgres"] = await servers.Postgres.CreateDatabaseAsync(),
            ["Orleans:ClusterId"] = id,
            ["Orleans:ServiceId"] = "idempotency-tests",
        };
        if (redis)
        {
            settings["ConnectionStrings:Redis"] = servers.Redis.ConnectionString;
        }

        return settings;
    }
}
