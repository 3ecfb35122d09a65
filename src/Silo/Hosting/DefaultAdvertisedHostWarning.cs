using System.Net;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Options;
using Orleans.Configuration;

namespace OrleansIdempotency.Silo.Hosting;

/// <summary>
/// Warns a silo that joins a cluster through Redis advertising the loopback address it got because
/// <c>Orleans:Endpoints:AdvertisedHost</c> was not set. Right for silos that share one host; on several hosts the
/// others cannot reach it, and two silos advertising the same address and port each take the other for its own
/// earlier run and declare it dead, over and over, with nothing else to say why.
/// </summary>
internal sealed partial class DefaultAdvertisedHostWarning(IOptions<EndpointOptions> endpoints, ILogger<DefaultAdvertisedHostWarning> logger)
    : ILifecycleParticipant<ISiloLifecycle>
{
    public void Participate(ISiloLifecycle lifecycle) =>
        lifecycle.Subscribe(nameof(DefaultAdvertisedHostWarning), ServiceLifecycleStage.First, Warn);

    private Task Warn(CancellationToken cancellationToken)
    {
        // The address the silo advertises, which the host may have set itself after the settings were read.
        if (endpoints.Value.AdvertisedIPAddress is { } address && IPAddress.IsLoopback(address))
        {
            LogDefaultAdvertisedHost(logger, address.ToString(), endpoints.Value.SiloPort);
        }

        return Task.CompletedTask;
    }

    [LoggerMessage(Level = LogLevel.Warning, Message =
        "This silo joins its cluster through Redis advertising {Address}:{Port}, the loopback default, as " +
        "Orleans__Endpoints__AdvertisedHost is not set: only silos on this host can reach it, and a silo on another host " +
        "advertising the same would be taken for this one restarted (each declaring the other dead). Set it to the name " +
        "or address other hosts reach this silo at, or to 127.0.0.1 where every silo shares this host.")]
    private static partial void LogDefaultAdvertisedHost(ILogger logger, string address, int port);
}
