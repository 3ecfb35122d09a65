using System.Globalization;
using System.Net;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.DependencyInjection.Extensions;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Options;
using Orleans.Clustering.Redis;
using Orleans.Configuration;
using Orleans.Serialization;
using Orleans.Storage;
using OrleansIdempotency.Grains;
using OrleansIdempotency.Silo.Storage;
using StackExchange.Redis;

namespace OrleansIdempotency.Silo.Hosting;

/// <summary>Hosts the idempotency grains in a silo: the one place clustering and storage are chosen.</summary>
public static class IdempotencySiloBuilderExtensions
{
    /// <summary>How many grain locations each silo caches unless <c>Orleans:DirectoryCacheSize</c> says otherwise.</summary>
    public const int DefaultDirectoryCacheSize = 100_000;

    // Orleans' LRU cache splits its capacity in three parts and refuses fewer entries, failing the silo's start with an
    // error that names neither the setting nor the cause; a size of 0 does not turn the cache off in this Orleans.
    private const int SmallestDirectoryCacheSize = 3;

    /// <summary>
    /// Configures the silo from <paramref name="configuration"/> (see <see cref="IdempotencyClusterSettings"/>):
    /// Redis clustering when <c>ConnectionStrings:Redis</c> is set, else localhost clustering; PostgreSQL records
    /// when <c>ConnectionStrings:Postgres</c> is set, else in-memory records, with a warning (outside Development only
    /// where <c>Orleans:AllowInMemoryRecords</c> allows them: <see cref="InMemoryStorageCheck"/>).
    /// </summary>
    public static ISiloBuilder UseIdempotency(this ISiloBuilder silo, IConfiguration configuration)
    {
        var settings = IdempotencyClusterSettings.From(configuration);
        if (settings.Redis is { } redis)
        {
            silo.UseRedisClustering(options => options.ConfigurationOptions = RedisConfiguration(redis));
            silo.Services.AddOptions<RedisClusteringOptions>().Configure<ILoggerFactory, TimeProvider>((options, loggers, time) =>
                options.CreateMultiplexer = o => RedisStartupWait.ConnectAsync(o, loggers.CreateLogger(typeof(RedisStartupWait)), time));
            silo.Configure<ClusterOptions>(options =>
            {
                options.ClusterId = settings.ClusterId;
                options.ServiceId = settings.ServiceId;
            });
            // A silo advertising a loopback address listens on it alone; any other, on every address the host has.
            var advertised = AdvertisedAddress(settings.AdvertisedHost ?? IdempotencyClusterSettings.DefaultAdvertisedHost);
            silo.ConfigureEndpoints(advertised, settings.SiloPort, settings.GatewayPort, listenOnAnyHostAddress: !IPAddress.IsLoopback(advertised));
            if (settings.AdvertisedHost is null)
            {
                silo.Services.AddSingleton<ILifecycleParticipant<ISiloLifecycle>, DefaultAdvertisedHostWarning>();
            }
        }
        else
        {
            silo.UseLocalhostClustering(settings.SiloPort, settings.GatewayPort, serviceId: settings.ServiceId, clusterId: settings.ClusterId);
        }

        if (settings.Postgres is { } postgres)
        {
            silo.AddIdempotencyPostgresStorage(postgres);
            silo.Services.AddSingleton(sp => new ServiceLock(sp.GetRequiredService<IdempotencyDatabase>(), settings.ServiceId,
                clustered: settings.Redis is not null, sp.GetRequiredService<TimeProvider>(), sp.GetRequiredService<ILogger<ServiceLock>>()));
            silo.Services.AddSingleton<ILifecycleParticipant<ISiloLifecycle>>(sp => sp.GetRequiredService<ServiceLock>());
        }
        else if (settings.Redis is not null)
        {
            // In-memory records live in one silo: several silos would each claim keys on their own.
            throw new InvalidOperationException(
                "ConnectionStrings:Redis is set but ConnectionStrings:Postgres is not: a cluster of silos needs its records in PostgreSQL. " +
                "Set ConnectionStrings:Postgres, or unset ConnectionStrings:Redis for the single-process embedded default.");
        }
        else
        {
            silo.AddIdempotencyMemoryStorage();
            silo.Services.AddSingleton<ILifecycleParticipant<ISiloLifecycle>, InMemoryStorageCheck>();
        }

        // Failure detection is a trade-off between fail-over time and false suspicion under load: operators tune it
        // (Orleans:Membership:ProbeTimeout, NumMissedProbesLimit, ...) with Orleans' own option names.
        silo.Services.Configure<ClusterMembershipOptions>(configuration.GetSection("Orleans:Membership"));
        // Likewise how long idle activations stay in memory. A key's activation is collected after 2 minutes idle
        // (Orleans' default is 15): retries come within seconds, every idle activation holds its stored response,
        // and the record stays in storage for the whole retention anyway. The activation that completes a key no
        // duplicate found in progress does not wait for this: it is freed at once (IdempotencyGrain.CompleteAsync).
        var collection = configuration.GetSection("Orleans:Collection");
        silo.Services.Configure<GrainCollectionOptions>(collection);
        var grainAge = collection["IdempotencyGrainAge"] is { Length: > 0 } age ? GrainAge(age) : TimeSpan.FromMinutes(2);
        // Orleans refuses an age within its collection quantum at start, naming neither setting.
        var quantum = TimeSpan.TryParse(collection["CollectionQuantum"], CultureInfo.InvariantCulture, out var set) ? set : GrainCollectionOptions.DEFAULT_COLLECTION_QUANTUM;
        if (grainAge <= quantum)
        {
            throw new InvalidOperationException(
                $"Orleans:Collection:IdempotencyGrainAge is {grainAge}, not longer than Orleans:Collection:CollectionQuantum ({quantum}), how often " +
                "Orleans collects idle activations: lengthen the age, or shorten the quantum.");
        }

        silo.Services.Configure<GrainCollectionOptions>(options => options.ClassSpecificCollectionAge[typeof(IdempotencyGrain).FullName!] = grainAge);
        // Orleans caches where each grain it placed or looked up lives, up to a million entries for 4 minutes by default,
        // and keeps an entry after its activation is gone. With a grain per key that held about 300 bytes and three
        // objects for each of the keys of the last 4 minutes (a million at these rates), all of it work for every full
        // garbage collection. The calls that use the entry come within seconds of the placement (the completion, the
        // retries); a miss costs one directory lookup.
        var directoryCacheSize = configuration.GetValue("Orleans:DirectoryCacheSize", DefaultDirectoryCacheSize);
        if (directoryCacheSize < SmallestDirectoryCacheSize)
        {
            throw new InvalidOperationException(
                $"Orleans:DirectoryCacheSize is {directoryCacheSize}: Orleans caches at least {SmallestDirectoryCacheSize} grain locations.");
        }

        silo.Services.Configure<GrainDirectoryOptions>(options => options.CacheSize = directoryCacheSize);
        silo.Services.TryAddSingleton(TimeProvider.System);
        return silo;
    }

    // As Orleans resolves a host name, once, as the silo is built, but judged a loopback address by what it resolves
    // to ("localhost", or a host name that /etc/hosts maps to 127.0.1.1), and naming the setting when it resolves to none.
    private static IPAddress AdvertisedAddress(string host)
    {
        if (IPAddress.TryParse(host, out var address))
        {
            return address;
        }

        IPAddress[] addresses;
        try
        {
            addresses = Dns.GetHostAddresses(host);
        }
        catch (System.Net.Sockets.SocketException ex)
        {
            throw new InvalidOperationException($"Orleans:Endpoints:AdvertisedHost = '{host}' does not resolve: {ex.Message}", ex);
        }

        return addresses.FirstOrDefault(a => a.AddressFamily == System.Net.Sockets.AddressFamily.InterNetwork) ?? addresses.FirstOrDefault()
            ?? throw new InvalidOperationException($"Orleans:Endpoints:AdvertisedHost = '{host}' resolves to no address.");
    }

    // hh:mm:ss, as the README gives it: a bare number would be read as days ("120" as four months).
    private static TimeSpan GrainAge(string value) =>
        value.Contains(':', StringComparison.Ordinal) && TimeSpan.TryParse(value, CultureInfo.InvariantCulture, out var age) && age > TimeSpan.Zero
            ? age
            : throw new InvalidOperationException(
                $"Orleans:Collection:IdempotencyGrainAge = '{value}' is not valid: a positive duration as hh:mm:ss (00:02:00 for two minutes).");

    /// <summary>
    /// Keeps idempotency records in this silo's memory (the embedded default, <see cref="InMemoryRecordStorage"/>):
    /// lost when the silo stops, dropped once expired. For a single silo only: each silo would hold its own records.
    /// </summary>
    public static ISiloBuilder AddIdempotencyMemoryStorage(this ISiloBuilder silo)
    {
        silo.Services.TryAddSingleton(TimeProvider.System);
        silo.Services.AddKeyedSingleton<IGrainStorage>(IdempotencyGrain.StorageName, (services, _) => new InMemoryRecordStorage(
            new IdempotencyStorageSerializer(services.GetRequiredService<Serializer>()), services.GetRequiredService<TimeProvider>(),
            logger: services.GetRequiredService<ILogger<InMemoryRecordStorage>>()));
        return silo;
    }

    /// <summary>Keeps idempotency records in PostgreSQL, applying the schema on start and purging expired records.</summary>
    public static ISiloBuilder AddIdempotencyPostgresStorage(this ISiloBuilder silo, string connectionString) =>
        silo.AddIdempotencyPostgresStorage(options => options.ConnectionString = connectionString);

    /// <inheritdoc cref="AddIdempotencyPostgresStorage(ISiloBuilder, string)"/>
    public static ISiloBuilder AddIdempotencyPostgresStorage(this ISiloBuilder silo, Action<IdempotencyStorageOptions> configure)
    {
        silo.Services.AddOptions<IdempotencyStorageOptions>()
            .Configure(configure)
            .Validate(o => !string.IsNullOrWhiteSpace(o.ConnectionString), "ConnectionStrings:Postgres is required.")
            .Validate(o => o.PurgeInterval > TimeSpan.Zero && o.PurgeBatchSize > 0, "PurgeInterval and PurgeBatchSize must be positive.");
        silo.Services.TryAddSingleton(TimeProvider.System);
        silo.Services.TryAddSingleton(sp => new IdempotencyDatabase(sp.GetRequiredService<IOptions<IdempotencyStorageOptions>>().Value.ConnectionString));
        silo.Services.TryAddSingleton<PostgresSchemaInstaller>();
        silo.Services.AddSingleton<ILifecycleParticipant<ISiloLifecycle>>(sp => sp.GetRequiredService<PostgresSchemaInstaller>());
        silo.Services.TryAddSingleton<ExpiredRecordPurger>();
        silo.Services.AddSingleton<IHostedService>(sp => sp.GetRequiredService<ExpiredRecordPurger>());
        silo.AddAdoNetGrainStorage(IdempotencyGrain.StorageName, (OptionsBuilder<AdoNetGrainStorageOptions> options) =>
            options.Configure<IdempotencyDatabase, Serializer>((o, database, serializer) =>
            {
                o.Invariant = "Npgsql";
                o.DataSource = database.DataSource;
                o.GrainStorageSerializer = new IdempotencyStorageSerializer(serializer);
            }));
        return silo;
    }

    /// <summary>Redis settings for membership that ride out a Redis restart instead of failing at once.</summary>
    internal static ConfigurationOptions RedisConfiguration(string connectionString)
    {
        var options = ConfigurationOptions.Parse(connectionString);
        options.AbortOnConnectFail = false;
        return options;
    }
}
